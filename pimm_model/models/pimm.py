"""PIMM multi-task head: per-task towers chained by PIM (eq. (4)-(6)) and attention (eq. (1)-(3))."""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP, AttentionTransfer
from pimm_model.pim import PIM
from pimm_model.registry import register_model


class PIMMStage(nn.Module):
    """Everything of task t > 0 after its tower: PIM, attention, output layer and the FC producing H_t.

    Args:
        d: width of the tower output and of every transferred representation.
        has_next: whether a later task consumes H_t. The last task has no FC, so that every parameter
            receives a gradient (DDP without find_unused_parameters requires it).
    """

    def __init__(self, d: int, has_next: bool) -> None:
        super().__init__()
        self.pim = PIM(d)
        self.attention = AttentionTransfer(d)
        self.out = nn.Linear(d, 1)
        # FC of Fig. 2 producing H_t; Linear + ReLU like AITM's info layer
        self.info = nn.Sequential(nn.Linear(d, d), nn.ReLU()) if has_next else nn.Identity()

    def forward(
        self, v: Tensor, prev_logit: Tensor, prev_label: Optional[Tensor], h_prev: Tensor, p: float
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Args:
            v: (B, d) output v_t of task t's tower.
            prev_logit: (B,) logit of task t-1.
            prev_label: (B,) label of task t-1, or None.
            h_prev: (B, d) H_{t-1}.
            p: probability of feeding the true label to the PIM.

        Returns:
            logit_t (B,), H_t (B, d) (U_t itself for the last task, unused), attention weights (B, 2).
        """
        prev_prob = torch.sigmoid(prev_logit)  # (B,)
        zm = self.pim(prev_prob, prev_label, h_prev, p)  # (B, d)  eq. (4)-(6)
        u, w = self.attention.forward_with_weights(v, zm)  # (B, d), (B, 2)  eq. (1)-(3)
        logit = self.out(u).squeeze(-1)  # (B,)
        h = self.info(u)  # (B, d)
        return logit, h, w


class PIMMHead(nn.Module):
    """The PIMM model after the shared embedding layer.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number T >= 2 of sequentially dependent tasks, in dependence order.
        tower_dims: hidden sizes of every task tower; d = tower_dims[-1].
        dropout: dropout probability after each tower layer.
    """

    def __init__(self, in_dim: int, num_tasks: int, tower_dims: List[int], dropout: float) -> None:
        super().__init__()
        if num_tasks < 2:
            raise ValueError(f"PIMM needs at least 2 tasks, got {num_tasks}")
        if len(tower_dims) == 0:
            raise ValueError("tower_dims must not be empty")
        d = tower_dims[-1]
        self.num_tasks = num_tasks
        self.towers = nn.ModuleList([MLP(in_dim, tower_dims, dropout) for _ in range(num_tasks)])
        # task 0 has no previous task: no PIM and no attention, v_0 feeds the output layer and H_0 = FC(v_0)
        self.out0 = nn.Linear(d, 1)
        self.info0 = nn.Sequential(nn.Linear(d, d), nn.ReLU())  # Linear + ReLU like AITM's info layer
        self.stages = nn.ModuleList([PIMMStage(d, has_next=t < num_tasks - 1) for t in range(1, num_tasks)])

    def forward_with_attention(
        self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0
    ) -> Tuple[Tensor, List[Tensor]]:
        """Logits (B, T) and, for every task t > 0, its attention weights (B, 2) over (v_t, Z^m_{t-1})."""
        vs: List[Tensor] = []
        for tower in self.towers:
            vs.append(tower(x))  # (B, d) per task
        logit = self.out0(vs[0]).squeeze(-1)  # (B,)
        h = self.info0(vs[0])  # (B, d)  H_0
        logits: List[Tensor] = [logit]
        weights: List[Tensor] = []
        for i, stage in enumerate(self.stages):  # task t = i + 1
            prev_label: Optional[Tensor] = None
            if labels is not None:
                prev_label = labels[:, i]  # (B,) label of task t-1
            logit, h, w = stage(vs[i + 1], logit, prev_label, h, p)  # (B,), (B, d), (B, 2)
            logits.append(logit)
            weights.append(w)
        return torch.stack(logits, dim=1), weights  # (B, T), T-1 x (B, 2)

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: (B, T) labels; only read in training mode, by the PIM modules.
            p: probability of feeding the previous task's true label to each PIM (eq. (4)).

        Returns:
            logits (B, T); probabilities are their sigmoid.
        """
        logits, _ = self.forward_with_attention(x, labels, p)
        return logits  # (B, T)


@register_model("pimm")
def build_pimm(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return PIMMHead(in_dim, num_tasks, cfg.tower_dims, cfg.dropout)
