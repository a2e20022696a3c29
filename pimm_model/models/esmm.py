"""ESMM (Ma et al., SIGIR'18), extended from click -> conversion to a chain of T tasks.

    x (B, F*D) -> tower_t MLP -> out_t -> l_t, the logit of q_t = P(y_t = 1 | y_{t-1} = 1, x)   (q_0 = P(y_0 = 1 | x))
    p_t = p_{t-1} * q_t = prod_{s<=t} q_s                                                       (entire-space marginal)
    returned: logit(p_t), so the trainer's per-task BCE is taken on the marginals over the entire space.

The conditionals are never supervised directly; every loss term is on a marginal p_t over all impressions, which is
ESMM's answer to sample selection bias and data sparsity.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP, chain_marginal_logits
from pimm_model.registry import register_model


class ESMMHead(nn.Module):
    """One conditional tower per task, multiplied along the chain.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number of tasks T, in chain order.
        tower_dims: hidden sizes of every task tower.
        dropout: dropout probability after each tower layer.

    Example:
        head = ESMMHead(40, 3, [32, 16], 0.0)
        marginal_logits, cond_logits = head.forward_with_conditionals(torch.randn(8, 40))  # (8, 3) each
    """

    def __init__(self, in_dim: int, num_tasks: int, tower_dims: List[int], dropout: float) -> None:
        super().__init__()
        self.towers = nn.ModuleList(
            [nn.Sequential(MLP(in_dim, tower_dims, dropout), nn.Linear(tower_dims[-1], 1)) for _ in range(num_tasks)]
        )

    def forward_with_conditionals(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Logits of the marginals p_t (B, T) and of the conditionals q_t (B, T)."""
        cond: List[Tensor] = []
        for tower in self.towers:
            cond.append(tower(x).squeeze(-1))  # (B,)  l_t = logit(q_t)
        cond_logits = torch.stack(cond, dim=1)  # (B, T)
        return chain_marginal_logits(cond_logits), cond_logits  # (B, T): logit(prod_{s<=t} q_s), (B, T)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: unused.
            p: unused.

        Returns:
            logits (B, T) of the marginals p_t = p_{t-1} * q_t (fp32).
        """
        marginal, _ = self.forward_with_conditionals(x)
        return marginal  # (B, T)


@register_model("esmm")
def build_esmm(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return ESMMHead(in_dim, num_tasks, cfg.tower_dims, cfg.dropout)
