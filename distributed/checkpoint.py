"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and the unsharded load used for export.

Layout of one checkpoint folder (one per epoch, persisted by Ray Train, which merges the ranks' files):
    .metadata, __<rank>_0.distcp   DCP: {"model": <sharded state dict>, "optim": <sparse + dense optimizer state>}
    train_state.json               written by rank 0: epoch, curriculum p, best epoch/score, history
DCP reshards on load, so a checkpoint written by N ranks loads into M ranks, or into one plain process for export.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

TRAIN_STATE_FILE = "train_state.json"


def save_checkpoint(path: str, model: nn.Module, optimizer: Any, train_state: Dict[str, Any]) -> None:
    """Collective: every rank writes its shards into `path` (a rank-local folder is fine: Ray merges them)."""
    os.makedirs(path, exist_ok=True)
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=path)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = os.path.join(path, TRAIN_STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(train_state, f, indent=1)
        os.replace(tmp, os.path.join(path, TRAIN_STATE_FILE))


def read_train_state(path: str) -> Dict[str, Any]:
    file = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"checkpoint {path} has no {TRAIN_STATE_FILE}: it is incomplete or not a pimm "
                                "checkpoint; pick another checkpoint folder")
    with open(file) as f:
        return json.load(f)


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[Any] = None) -> Dict[str, Any]:
    """Collective: restore model (and optimizer, when given) in place from `path`; returns the train state."""
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        # Lazily created state (dense Adam moments) must exist to be loaded into; the dummy step this runs changes
        # nothing that survives, since parameters and state are overwritten just below.
        optimizer.init_state()
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
        optimizer.zero_grad()
    return read_train_state(path)


def load_unsharded(path: str, module: nn.Module) -> None:
    """Load the model part of a sharded checkpoint into a plain, unsharded `module` in this single process (no
    process group). `module` must have the state-dict keys of the module that was sharded."""
    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    module.load_state_dict(state["model"])
