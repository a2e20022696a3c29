"""Configuration dataclasses for the model and the curriculum schedule."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class ModelConfig:
    """Architecture of a multi-task model.

    Args:
        name: key of the head in the model registry (``pimm_model.registry.MODELS``).
        embedding_dim: embedding size D of every feature field (the paper uses 5 on Ali-CCP, 24 on the
            industrial data set).
        tower_dims: hidden sizes of each task-specific tower; the last one is d, the size of every
            representation passed between tasks.
        dropout: dropout probability after each tower layer.
    """

    name: str = "pimm"
    embedding_dim: int = 5
    tower_dims: List[int] = field(default_factory=lambda: [128, 64, 32])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.embedding_dim <= 0:
            raise ValueError(f"model.embedding_dim ({self.embedding_dim}) must be > 0")
        self.tower_dims = [int(h) for h in self.tower_dims]
        if len(self.tower_dims) == 0:
            raise ValueError("model.tower_dims must not be empty (its last entry is the transfer size d)")
        if any(h <= 0 for h in self.tower_dims):
            raise ValueError(f"model.tower_dims ({self.tower_dims}) must all be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout ({self.dropout}) must be in [0, 1)")


@dataclass
class CurriculumConfig:
    """Curriculum of the PIM modules: probability p of feeding the true previous label (eq. (4)).

    Args:
        name: key of the schedule in the schedule registry (``pimm_model.schedules.SCHEDULES``).
        alpha: initial value of p.
        speed: decrease of p per epoch (S).
        beta: lower limit of p.
    """

    name: str = "epoch_linear"
    alpha: float = 0.5
    speed: float = 0.25
    beta: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"curriculum.alpha ({self.alpha}) must be in [0, 1]")
        if self.beta < 0.0:
            raise ValueError(f"curriculum.beta ({self.beta}) must be >= 0")
        if self.beta > self.alpha:
            raise ValueError(f"curriculum.beta ({self.beta}) must be <= curriculum.alpha ({self.alpha})")
        if self.speed < 0.0:
            raise ValueError(f"curriculum.speed ({self.speed}) must be >= 0")
