"""W&B on rank 0 only. Under Ray 2.60 (Train V2) `setup_wandb(rank_zero_only=True)` opens a run on every rank, so
rank 0 calls `wandb.init` itself. Offline by default: files land in <run dir>/wandb and `wandb sync` uploads later."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional


class Tracker:
    def __init__(self, run: Optional[Any]):
        self.run = run

    def log(self, data: Dict[str, Any], step: Optional[int] = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: Dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in data.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def start_tracker(enabled: bool, mode: str, project: str, entity: Optional[str], group: Optional[str],
                  run_dir: str, run_id: str, config: Dict[str, Any]) -> Tracker:
    """A stable run id + resume="allow" lets a restarted worker group continue the same W&B run."""
    if not enabled or mode == "disabled":
        return Tracker(None)
    import wandb  # imported here: only rank 0 needs it

    os.makedirs(run_dir, exist_ok=True)
    run = wandb.init(project=project, entity=entity, group=group, dir=run_dir, mode=mode, id=run_id,
                     resume="allow", config=config, name=run_id)
    return Tracker(run)
