"""MNCM (Wu, CIKM'22): AITM on an experts bottom, with information transfer at two levels.

No public code exists. From the paper: MNCM keeps AITM's chain of towers and its adaptive transfer between them
(the Task-Level Information Transfer Module, TITM), replaces AITM's shared bottom (here: the shared embedding) by
PLE-style task-specific and shared experts, and adds an Expert-Level Information Transfer Module (EITM) that passes
the previous task's task-specific experts to the current task's. How this implementation reads it, and what it had
to decide:

* Experts bottom: one CGC level (as in PLE with one level): ``num_shared_experts`` shared experts and
  ``num_task_experts`` experts per task (the PIMM paper: 2 and 2), all reading x, of sizes ``expert_dims``.
  A per-task softmax gate over (own experts after EITM ; shared experts) feeds task t's tower.
* EITM is AITM's transfer applied expert by expert. The previous task's task-specific experts, after their own
  transfer, go through an info layer (Linear + ReLU, shared by the experts of that task pair) and each expert j of
  task t attends over {its own output, the transferred output of expert j of task t-1} with the same Q·K attention
  as AITM (no residual, no bias). Decisions: experts are paired by index (both tasks have the same number), one
  info layer and one attention block per task pair (shared by its experts), and the transfer is cascaded (task t
  receives task t-1's experts after task t-1's own EITM), mirroring AITM's cascade of z_t. Shared experts are not
  transferred: they are already common to every task.
* TITM is exactly AITM's AIT between the towers (``AITStage``).
* Loss: per-task BCE plus AITM's label constraint with the same weight (``model.aitm_constraint_weight``); the
  paper builds on AITM's objective.

    x -> shared experts S (B, m_s, e);  task experts E_t (B, m_t, e)
    Ẽ_0 = E_0;  t > 0: Ẽ_t = Att_expert(E_t, info^e_{t-1}(Ẽ_{t-1}))           (B, m_t, e)   EITM
    f_t = gate_t(x) · [Ẽ_t ; S]                                                (B, e)
    q_t = tower_t(f_t);  z_0 = q_0;  t > 0: z_t = Att_tower(q_t, info_{t-1}(z_{t-1}))   (B, d)   TITM (AITM)
    logit_t = out_t(z_t)
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP, AttentionTransfer, Experts, Gate
from pimm_model.losses import label_constraint
from pimm_model.models.aitm import AITStage
from pimm_model.registry import register_model


class MNCMStage(nn.Module):
    """Task t > 0: its experts with the expert-level transfer (EITM), its gate and tower, and the tower-level
    transfer (TITM).

    Args:
        in_dim: width of x.
        num_shared: shared experts m_s.
        num_task: experts per task m_t.
        expert_dims: hidden sizes of every expert; e = expert_dims[-1].
        tower_dims: hidden sizes of the tower; d = tower_dims[-1].
        has_next: whether task t+1 exists (only then the two info layers, which would get no gradient otherwise).
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, in_dim: int, num_shared: int, num_task: int, expert_dims: List[int], tower_dims: List[int],
                 has_next: bool, dropout: float) -> None:
        super().__init__()
        e, d = expert_dims[-1], tower_dims[-1]
        self.experts = Experts(in_dim, num_task, expert_dims, dropout)
        self.expert_attention = AttentionTransfer(e, residual=False, bias=False)
        self.expert_info = MLP(e, [e], dropout) if has_next else nn.Identity()
        self.gate = Gate(in_dim, num_task + num_shared)
        self.tower = MLP(e, tower_dims, dropout)
        self.ait = AITStage(d, has_next, dropout)

    def forward(self, x: Tensor, shared: Tensor, experts_prev: Tensor, p_prev: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            shared: (B, m_s, e) shared experts' outputs.
            experts_prev: (B, m_t, e) task t-1's experts after EITM, passed through its info layer.
            p_prev: (B, d) task t-1's tower-level transfer p_{t-1}.

        Returns:
            logit_t (B,), task t's experts after EITM Ẽ_t (B, m_t, e), the same through the info layer for task t+1
            (B, m_t, e) (Ẽ_t itself for the last task, unused), p_t (B, d), the expert-level attention weights
            (B, m_t, 2) and the tower-level ones (B, 2).
        """
        own = self.experts(x)  # (B, m_t, e)
        own, w_expert = self.expert_attention.forward_with_weights(own, experts_prev)  # (B, m_t, e), (B, m_t, 2)
        f = self.gate(x, torch.cat([own, shared], dim=1))  # (B, e)
        q = self.tower(f)  # (B, d)
        logit, p_t, w_tower = self.ait(q, p_prev)  # (B,), (B, d), (B, 2)
        return logit, own, self.expert_info(own), p_t, w_expert, w_tower


class MNCMHead(nn.Module):
    """Experts bottom + expert-level and tower-level adaptive transfer along the chain.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number T >= 2 of tasks, in chain order.
        num_shared: shared experts m_s (the paper: 2).
        num_task: experts per task m_t (the paper: 2).
        expert_dims: hidden sizes of every expert.
        tower_dims: hidden sizes of every task tower.
        dropout: dropout probability after each hidden layer.
        constraint_weight: weight of AITM's label-constraint loss (``extra_loss``).

    Example:
        head = MNCMHead(40, 3, 2, 2, [32], [32, 16], 0.0, 0.6)
        logits, experts, w_expert, w_tower = head.forward_with_transfers(torch.randn(8, 40))
        # (8, 3); 3 x (8, 2, 32) experts after EITM; 2 x (8, 2, 2); 2 x (8, 2)
    """

    def __init__(self, in_dim: int, num_tasks: int, num_shared: int, num_task: int, expert_dims: List[int],
                 tower_dims: List[int], dropout: float, constraint_weight: float) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"MNCM needs at least 2 tasks, got {num_tasks}")
        e, d = expert_dims[-1], tower_dims[-1]
        self.shared_experts = Experts(in_dim, num_shared, expert_dims, dropout)
        # task 0: no transfer in; its experts and tower output are transferred to task 1
        self.experts0 = Experts(in_dim, num_task, expert_dims, dropout)
        self.expert_info0 = MLP(e, [e], dropout)
        self.gate0 = Gate(in_dim, num_task + num_shared)
        self.tower0 = MLP(e, tower_dims, dropout)
        self.out0 = nn.Linear(d, 1)
        self.info0 = MLP(d, [d], dropout)
        self.stages = nn.ModuleList(
            [MNCMStage(in_dim, num_shared, num_task, expert_dims, tower_dims, t < num_tasks - 1, dropout)
             for t in range(1, num_tasks)]
        )
        self.constraint_weight = constraint_weight

    def forward_with_transfers(self, x: Tensor) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
        """Logits (B, T); every task's experts after EITM (B, m_t, e); for every task t > 0 the expert-level
        attention weights (B, m_t, 2) and the tower-level ones (B, 2)."""
        shared = self.shared_experts(x)  # (B, m_s, e)
        own = self.experts0(x)  # (B, m_t, e)  Ẽ_0 = E_0
        experts_after: List[Tensor] = [own]
        q0 = self.tower0(self.gate0(x, torch.cat([own, shared], dim=1)))  # (B, d)  z_0 = q_0
        logits: List[Tensor] = [self.out0(q0).squeeze(-1)]  # (B,)
        experts_prev = self.expert_info0(own)  # (B, m_t, e)
        p_prev = self.info0(q0)  # (B, d)
        w_experts: List[Tensor] = []
        w_towers: List[Tensor] = []
        for stage in self.stages:
            logit, own, experts_prev, p_prev, w_e, w_t = stage(x, shared, experts_prev, p_prev)
            logits.append(logit)  # (B,)
            experts_after.append(own)  # (B, m_t, e)
            w_experts.append(w_e)  # (B, m_t, 2)
            w_towers.append(w_t)  # (B, 2)
        return torch.stack(logits, dim=1), experts_after, w_experts, w_towers  # (B, T), ...

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: unused (read only by the loss).
            p: unused.

        Returns:
            logits (B, T).
        """
        logits, _, _, _ = self.forward_with_transfers(x)
        return logits  # (B, T)

    def extra_loss(self, logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
        """AITM's label constraint c * mean(max(ŷ_t - ŷ_{t-1}, 0)) over rows and task pairs."""
        return self.constraint_weight * label_constraint(logits, weights)  # ()


@register_model("mncm")
def build_mncm(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return MNCMHead(in_dim, num_tasks, cfg.num_shared_experts, cfg.num_task_experts, cfg.expert_dims,
                    cfg.tower_dims, cfg.dropout, cfg.aitm_constraint_weight)
