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
        expert_dims: hidden sizes of every expert (mmoe, ple, mncm) and of the shared bottom (shared_bottom, which
            is one always-on expert); the towers of those models read its last entry.
        num_experts: number of shared experts of MMoE (the paper: 4 on Ali-CCP, 6 on the industrial set).
        num_shared_experts: shared experts per extraction level of PLE and MNCM (the paper: 2).
        num_task_experts: task-specific experts per task and level of PLE and MNCM (the paper: 2).
        num_levels: extraction (CGC) levels of PLE; 1 is CGC.
        aitm_constraint_weight: weight of AITM's (and MNCM's) label-constraint loss (the official AITM code: 0.6).
        linear_chain_factorised: ``linear`` only: per-task linear conditionals multiplied along the chain, as in
            ESMM, instead of one independent logistic regression per task (see ``pimm_model/models/linear.py``).
    """

    name: str = "pimm"
    embedding_dim: int = 5
    tower_dims: List[int] = field(default_factory=lambda: [128, 64, 32])
    dropout: float = 0.0
    expert_dims: List[int] = field(default_factory=lambda: [128])
    num_experts: int = 4
    num_shared_experts: int = 2
    num_task_experts: int = 2
    num_levels: int = 1
    aitm_constraint_weight: float = 0.6
    linear_chain_factorised: bool = False

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
        self.expert_dims = [int(h) for h in self.expert_dims]
        if len(self.expert_dims) == 0 or any(h <= 0 for h in self.expert_dims):
            raise ValueError(f"model.expert_dims ({self.expert_dims}) must be a non-empty list of sizes > 0")
        if self.num_experts < 1:
            raise ValueError(f"model.num_experts ({self.num_experts}) must be >= 1")
        if self.num_shared_experts < 1:
            raise ValueError(f"model.num_shared_experts ({self.num_shared_experts}) must be >= 1")
        if self.num_task_experts < 1:
            raise ValueError(f"model.num_task_experts ({self.num_task_experts}) must be >= 1")
        if self.num_levels < 1:
            raise ValueError(f"model.num_levels ({self.num_levels}) must be >= 1")
        if self.aitm_constraint_weight < 0.0:
            raise ValueError(f"model.aitm_constraint_weight ({self.aitm_constraint_weight}) must be >= 0")


@dataclass
class CurriculumConfig:
    """Curriculum of the PIM modules: probability p of feeding the true previous label (eq. (4)).

    Args:
        name: key of the schedule in the schedule registry (``pimm_model.schedules.SCHEDULES``).
        alpha: initial value of p.
        speed: decrease of p per epoch (S).
        beta: lower limit of p.
        total_epochs: ``cosine`` only: epochs over which p goes from alpha down to beta.
        auc_target: ``adaptive`` only: validation AUC of the previous tasks at which p reaches beta (p is alpha
            at chance, AUC 0.5).
    """

    name: str = "epoch_linear"
    alpha: float = 0.5
    speed: float = 0.25
    beta: float = 0.25
    total_epochs: int = 3
    auc_target: float = 0.75

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"curriculum.alpha ({self.alpha}) must be in [0, 1]")
        if self.beta < 0.0:
            raise ValueError(f"curriculum.beta ({self.beta}) must be >= 0")
        if self.beta > self.alpha:
            raise ValueError(f"curriculum.beta ({self.beta}) must be <= curriculum.alpha ({self.alpha})")
        if self.speed < 0.0:
            raise ValueError(f"curriculum.speed ({self.speed}) must be >= 0")
        if self.total_epochs < 1:
            raise ValueError(f"curriculum.total_epochs ({self.total_epochs}) must be >= 1")
        if not 0.5 < self.auc_target <= 1.0:
            raise ValueError(f"curriculum.auc_target ({self.auc_target}) must be in (0.5, 1]")
