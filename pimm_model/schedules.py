"""Registry of curriculum schedules: the probability p with which a PIM module feeds the true label.

A schedule is a function ``(cfg, epoch, step, steps_per_epoch, metrics) -> p``. It runs on the driver (rank 0),
which then broadcasts p to every worker; the PIM modules only ever receive the float.

    epoch_linear   p = max(alpha - E S, beta)                       eq. (4), once per epoch (the default)
    step_linear    p = max(alpha - (E + s/N) S, beta)               eq. (4) on the fractional epoch, every step
    cosine         p = beta + (alpha - beta) (1 + cos(pi min(E'/K, 1))) / 2,  E' = E + s/N, K = total_epochs
    constant       p = alpha
    adaptive       p = alpha - (alpha - beta) clip((AUC_prev - 0.5) / (auc_target - 0.5), 0, 1)
                   AUC_prev: the lowest validation AUC of the tasks that feed a PIM (all but the last)

(E: epoch from 0, s: step within the epoch, N: steps per epoch.)
"""

import math
from typing import Callable, Dict, Optional

from pimm_model.config import CurriculumConfig

ScheduleFn = Callable[[CurriculumConfig, int, int, int, Optional[dict]], float]

SCHEDULES: Dict[str, ScheduleFn] = {}

# schedules whose p changes within an epoch: the trainer recomputes and broadcasts p every step for these
PER_STEP_SCHEDULES = {"step_linear"}


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


def _fractional_epoch(epoch: int, step: int, steps_per_epoch: int) -> float:
    """E + s/N: the epoch counted in fractions, for schedules finer than per-epoch."""
    return epoch + step / max(steps_per_epoch, 1)


@register_schedule("step_linear")
def step_linear(cfg: CurriculumConfig, epoch: int, step: int, steps_per_epoch: int, metrics: Optional[dict]) -> float:
    """eq. (4) on the fractional epoch: p falls by speed/N every step, so even one epoch follows the curriculum."""
    return max(cfg.alpha - _fractional_epoch(epoch, step, steps_per_epoch) * cfg.speed, cfg.beta)


@register_schedule("cosine")
def cosine(cfg: CurriculumConfig, epoch: int, step: int, steps_per_epoch: int, metrics: Optional[dict]) -> float:
    """p follows half a cosine from alpha (epoch 0) to beta (after ``total_epochs``), then stays at beta."""
    progress = min(_fractional_epoch(epoch, step, steps_per_epoch) / cfg.total_epochs, 1.0)
    return cfg.beta + (cfg.alpha - cfg.beta) * 0.5 * (1.0 + math.cos(math.pi * progress))


def previous_task_auc(metrics: Optional[dict]) -> Optional[float]:
    """The lowest validation AUC among the tasks whose prediction feeds a later task's PIM (all but the last).

    Args:
        metrics: ``{"auc": {task: auc}}`` from the last validation, tasks in chain order, or None.

    Returns:
        that AUC, or None when there is none yet (no metrics, fewer than 2 tasks, or only NaN AUCs).
    """
    if not metrics or not isinstance(metrics.get("auc"), dict):
        return None
    aucs = list(metrics["auc"].values())[:-1]  # tasks 0 .. T-2 feed the PIMs of tasks 1 .. T-1
    finite = [float(a) for a in aucs if a is not None and math.isfinite(float(a))]
    return min(finite) if finite else None


@register_schedule("adaptive")
def adaptive(cfg: CurriculumConfig, epoch: int, step: int, steps_per_epoch: int, metrics: Optional[dict]) -> float:
    """p falls from alpha (previous tasks at chance, AUC 0.5) to beta (AUC >= auc_target) as the previous tasks'
    validation AUC rises; alpha until the first validation. The worst previous task decides: the predictions are
    trusted only once every one of them is."""
    auc = previous_task_auc(metrics)
    if auc is None:
        return cfg.alpha
    skill = min(max((auc - 0.5) / (cfg.auc_target - 0.5), 0.0), 1.0)  # 0 at chance, 1 at the target
    return cfg.alpha - (cfg.alpha - cfg.beta) * skill
