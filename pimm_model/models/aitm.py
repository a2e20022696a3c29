"""AITM (Xi et al., KDD'21): towers chained by adaptive information transfer, plus a label-constraint loss.

Tasks in chain order (task 0 first; public ports that start from the last task reverse the chain):

    q_t = tower_t(x)                                               (B, d)  the task's own representation
    z_0 = q_0;  for t > 0:
        p_{t-1} = info_{t-1}(z_{t-1}) = ReLU(W z_{t-1} + b)         (B, d)  transferred from the previous task
        z_t = sum_{a in {q_t, p_{t-1}}} w_a V(a),                  (B, d)  no residual
        w_a = softmax_a( <Q(a), K(a)> / sqrt(d) )                  (B, 2)  query and key of the SAME input a
    logit_t = out_t(z_t)
    loss += c * mean over rows and t of max(ŷ_t - ŷ_{t-1}, 0)      label constraint, c = 0.6 in the official code

As in the official code, Q, K and V have no bias and there is no residual; the attention is the shared
``AttentionTransfer`` with ``residual=False, bias=False`` (PIMM's eq. (1) is the same block with the residual).
Known bugs of public PyTorch ports avoided here: the score Q(a)·V(a) instead of Q(a)·K(a), the constraint summed
over rows instead of averaged, and the task order reversed.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP, AttentionTransfer
from pimm_model.losses import label_constraint
from pimm_model.registry import register_model


class AITStage(nn.Module):
    """Everything of task t > 0 after its own representation q_t: AIT attention, output layer, info layer.

    Args:
        d: width of q_t and of the transferred p_{t-1}.
        has_next: whether a later task reads p_t; the last task has no info layer, so that every parameter
            receives a gradient (DDP without find_unused_parameters requires it).
        dropout: dropout probability after the info layer (as in the official code).
    """

    def __init__(self, d: int, has_next: bool, dropout: float) -> None:
        super().__init__()
        self.attention = AttentionTransfer(d, residual=False, bias=False)
        self.out = nn.Linear(d, 1)
        self.info = MLP(d, [d], dropout) if has_next else nn.Identity()

    def forward(self, q: Tensor, p_prev: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """Args:
            q: (..., d) the task's own representation q_t.
            p_prev: (..., d) p_{t-1}, transferred from the previous task.

        Returns:
            logit_t (...,), p_t = info(z_t) (..., d) (z_t itself for the last task, unused), weights (..., 2) over
            (q_t, p_{t-1}).
        """
        z, w = self.attention.forward_with_weights(q, p_prev)  # (..., d), (..., 2)
        return self.out(z).squeeze(-1), self.info(z), w


class AITMHead(nn.Module):
    """Per-task towers chained by AIT modules.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number T >= 2 of tasks, in chain order.
        tower_dims: hidden sizes of every task tower; d = tower_dims[-1].
        dropout: dropout probability after each tower layer and after the info layers.
        constraint_weight: weight of the label-constraint loss (``extra_loss``).

    Example:
        head = AITMHead(40, 3, [32, 16], 0.0, 0.6)
        logits, weights = head.forward_with_attention(torch.randn(8, 40))  # (8, 3), 2 x (8, 2)
    """

    def __init__(self, in_dim: int, num_tasks: int, tower_dims: List[int], dropout: float,
                 constraint_weight: float) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"AITM needs at least 2 tasks, got {num_tasks}")
        d = tower_dims[-1]
        self.towers = nn.ModuleList([MLP(in_dim, tower_dims, dropout) for _ in range(num_tasks)])
        self.out0 = nn.Linear(d, 1)
        self.info0 = MLP(d, [d], dropout)  # p_0 = info_0(q_0)
        self.stages = nn.ModuleList([AITStage(d, t < num_tasks - 1, dropout) for t in range(1, num_tasks)])
        self.constraint_weight = constraint_weight

    def forward_with_attention(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """Logits (B, T) and, for every task t > 0, its attention weights (B, 2) over (q_t, p_{t-1})."""
        qs: List[Tensor] = []
        for tower in self.towers:
            qs.append(tower(x))  # (B, d) per task
        logits: List[Tensor] = [self.out0(qs[0]).squeeze(-1)]  # (B,)  z_0 = q_0
        p_prev = self.info0(qs[0])  # (B, d)
        weights: List[Tensor] = []
        for i, stage in enumerate(self.stages):  # task t = i + 1
            logit, p_prev, w = stage(qs[i + 1], p_prev)  # (B,), (B, d), (B, 2)
            logits.append(logit)
            weights.append(w)
        return torch.stack(logits, dim=1), weights  # (B, T), T-1 x (B, 2)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: unused (AITM reads labels only in its loss).
            p: unused.

        Returns:
            logits (B, T).
        """
        logits, _ = self.forward_with_attention(x)
        return logits  # (B, T)

    def extra_loss(self, logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """The label constraint c * mean(max(ŷ_t - ŷ_{t-1}, 0)) over rows (0-weight rows left out) and task pairs."""
        return self.constraint_weight * label_constraint(logits, weights)  # ()


@register_model("aitm")
def build_aitm(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return AITMHead(in_dim, num_tasks, cfg.tower_dims, cfg.dropout, cfg.aitm_constraint_weight)
