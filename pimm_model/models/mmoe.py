"""MMoE (Ma et al., KDD'18): shared experts mixed by one softmax gate per task, then one tower per task.

    x (B, F*D) -> experts E_1..E_n (MLP, expert_dims)          -> (B, n, e)
    g_t(x) = softmax(W_t x)                                       (B, n), sums to 1
    f_t(x) = sum_i g_t(x)_i E_i(x)                                (B, e)
    logit_t = out_t(tower_t(f_t(x)))                              (B,)
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP, Experts, Gate
from pimm_model.registry import register_model


class MMoEHead(nn.Module):
    """Multi-gate mixture of experts.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number of tasks T.
        num_experts: number of shared experts n (the paper: 4 on Ali-CCP, 6 on the industrial set).
        expert_dims: hidden sizes of every expert.
        tower_dims: hidden sizes of every task tower.
        dropout: dropout probability after each hidden layer.

    Example:
        head = MMoEHead(40, 3, 4, [32], [32, 16], 0.0)
        logits, gates = head.forward_with_gates(torch.randn(8, 40))  # (8, 3), 3 x (8, 4)
    """

    def __init__(self, in_dim: int, num_tasks: int, num_experts: int, expert_dims: List[int],
                 tower_dims: List[int], dropout: float) -> None:
        super().__init__()
        self.experts = Experts(in_dim, num_experts, expert_dims, dropout)
        self.gates = nn.ModuleList([Gate(in_dim, num_experts) for _ in range(num_tasks)])
        self.towers = nn.ModuleList(
            [nn.Sequential(MLP(self.experts.out_dim, tower_dims, dropout), nn.Linear(tower_dims[-1], 1))
             for _ in range(num_tasks)]
        )

    def forward_with_gates(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """Logits (B, T) and every task's gate weights (B, n)."""
        experts = self.experts(x)  # (B, n, e)
        logits: List[Tensor] = []
        gates: List[Tensor] = []
        for gate, tower in zip(self.gates, self.towers):
            f, g = gate.forward_with_weights(x, experts)  # (B, e), (B, n)
            logits.append(tower(f).squeeze(-1))  # (B,)
            gates.append(g)
        return torch.stack(logits, dim=1), gates  # (B, T), T x (B, n)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: unused.
            p: unused.

        Returns:
            logits (B, T).
        """
        logits, _ = self.forward_with_gates(x)
        return logits  # (B, T)


@register_model("mmoe")
def build_mmoe(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return MMoEHead(in_dim, num_tasks, cfg.num_experts, cfg.expert_dims, cfg.tower_dims, cfg.dropout)
