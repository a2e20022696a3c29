"""Shared-Bottom (Caruana 1997): one bottom MLP shared by every task, then one tower per task.

    x (B, F*D) -> bottom MLP (expert_dims) -> b (B, e) -> tower_t MLP (tower_dims) -> out_t -> logit_t

The bottom is ``cfg.expert_dims`` (Shared-Bottom is an MMoE with one always-on expert), so ``cfg.tower_dims`` means
the same tower in every model of the registry.
"""

from typing import List, Optional

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP
from pimm_model.registry import register_model


class SharedBottomHead(nn.Module):
    """Shared bottom + per-task towers.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number of tasks T.
        bottom_dims: hidden sizes of the shared bottom.
        tower_dims: hidden sizes of every task tower.
        dropout: dropout probability after each hidden layer.

    Example:
        head = SharedBottomHead(40, 3, [64], [32, 16], 0.0)
        logits = head(torch.randn(8, 40))  # (8, 3)
    """

    def __init__(self, in_dim: int, num_tasks: int, bottom_dims: List[int], tower_dims: List[int],
                 dropout: float) -> None:
        super().__init__()
        self.bottom = MLP(in_dim, bottom_dims, dropout)
        self.towers = nn.ModuleList(
            [nn.Sequential(MLP(self.bottom.out_dim, tower_dims, dropout), nn.Linear(tower_dims[-1], 1))
             for _ in range(num_tasks)]
        )

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: unused (the signature shared by every head).
            p: unused.

        Returns:
            logits (B, T).
        """
        b = self.bottom(x)  # (B, e)
        logits: List[Tensor] = []
        for tower in self.towers:
            logits.append(tower(b).squeeze(-1))  # (B,)  out_t(tower_t(b))
        return torch.stack(logits, dim=1)  # (B, T)


@register_model("shared_bottom")
def build_shared_bottom(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return SharedBottomHead(in_dim, num_tasks, cfg.expert_dims, cfg.tower_dims, cfg.dropout)
