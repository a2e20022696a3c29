"""Registry of curriculum schedules: the probability p with which a PIM module feeds the true label.

A schedule is a function ``(cfg, epoch, step, steps_per_epoch, metrics) -> p``. It runs on the driver (rank 0),
which then broadcasts p to every worker; the PIM modules only ever receive the float.
"""

from typing import Callable, Dict, Optional

from pimm_model.config import CurriculumConfig

ScheduleFn = Callable[[CurriculumConfig, int, int, int, Optional[dict]], float]

SCHEDULES: Dict[str, ScheduleFn] = {}


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Decorator adding a schedule to ``SCHEDULES`` under ``name``.

    Args:
        name: registry key, matched against ``CurriculumConfig.name``.
    """

    def deco(fn: ScheduleFn) -> ScheduleFn:
        if name in SCHEDULES:
            raise ValueError(f"curriculum schedule {name!r} is already registered")
        SCHEDULES[name] = fn
        return fn

    return deco


def curriculum_p(
    cfg: CurriculumConfig,
    epoch: int,
    step: int = 0,
    steps_per_epoch: int = 1,
    metrics: Optional[dict] = None,
) -> float:
    """Probability p of taking the true previous label, for the schedule named by ``cfg.name``.

    Args:
        cfg: curriculum configuration.
        epoch: current epoch E, counted from 0.
        step: step within the epoch (for schedules finer than per-epoch).
        steps_per_epoch: number of steps in an epoch.
        metrics: latest validation metrics (for adaptive schedules), or None.

    Returns:
        p in [0, 1].
    """
    if cfg.name not in SCHEDULES:
        raise KeyError(f"unknown curriculum schedule {cfg.name!r}; registered: {sorted(SCHEDULES)}")
    if epoch < 0:
        raise ValueError(f"epoch ({epoch}) must be >= 0")
    p = SCHEDULES[cfg.name](cfg, epoch, step, steps_per_epoch, metrics)
    return min(max(float(p), 0.0), 1.0)


@register_schedule("epoch_linear")
def epoch_linear(cfg: CurriculumConfig, epoch: int, step: int, steps_per_epoch: int, metrics: Optional[dict]) -> float:
    """p decreases linearly per epoch from alpha down to the floor beta."""
    return max(cfg.alpha - epoch * cfg.speed, cfg.beta)  # eq. (4)


@register_schedule("constant")
def constant(cfg: CurriculumConfig, epoch: int, step: int, steps_per_epoch: int, metrics: Optional[dict]) -> float:
    """p stays at alpha for the whole run (no curriculum)."""
    return cfg.alpha
