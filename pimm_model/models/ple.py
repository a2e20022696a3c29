"""PLE (Tang et al., RecSys'20): stacked CGC extraction levels of task-specific and shared experts.

Level l (inputs: one per task, h_t^{l-1}, and a shared one, h_s^{l-1}; all equal x at l = 1):

    E_t^l = task t's experts on h_t^{l-1}                        (B, m_t, e)
    E_s^l = shared experts on h_s^{l-1}                          (B, m_s, e)
    h_t^l = sum softmax(W_t^l h_t^{l-1}) * [E_t^l ; E_s^l]       (B, e)   task gate over own + shared experts
    h_s^l = sum softmax(W_s^l h_s^{l-1}) * [E_1^l ; ... ; E_T^l ; E_s^l]   shared gate over all experts
                                                                          (intermediate levels only)
    logit_t = out_t(tower_t(h_t^L))

The last level has no shared gate: nothing reads h_s^L, and a module without gradient would break DDP.
``num_levels = 1`` is CGC.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import MLP, Experts, Gate
from pimm_model.registry import register_model


class CGCLevel(nn.Module):
    """One extraction level: task-specific and shared experts, per-task gates and (optionally) a shared gate.

    Args:
        in_dim: width of every input of the level.
        num_tasks: number of tasks T.
        num_shared: shared experts m_s.
        num_task: experts per task m_t.
        expert_dims: hidden sizes of every expert.
        dropout: dropout probability after each expert layer.
        shared_gate: whether the level produces a shared output for the next level.
    """

    def __init__(self, in_dim: int, num_tasks: int, num_shared: int, num_task: int, expert_dims: List[int],
                 dropout: float, shared_gate: bool) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList([Experts(in_dim, num_task, expert_dims, dropout) for _ in range(num_tasks)])
        self.shared_experts = Experts(in_dim, num_shared, expert_dims, dropout)
        self.task_gates = nn.ModuleList([Gate(in_dim, num_task + num_shared) for _ in range(num_tasks)])
        # a list of zero or one gate, so that the scripted forward needs no Optional module
        self.shared_gate = nn.ModuleList([Gate(in_dim, num_tasks * num_task + num_shared)] if shared_gate else [])
        self.out_dim = self.shared_experts.out_dim

    def forward(self, task_inputs: List[Tensor], shared_input: Tensor) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
        """Args:
            task_inputs: T x (B, in_dim), h_t^{l-1}.
            shared_input: (B, in_dim), h_s^{l-1}.

        Returns:
            T x (B, e) task outputs h_t^l, the shared output h_s^l (B, e) (the shared input itself when the level
            has no shared gate), and the gate weights (T task gates, then the shared gate if any).
        """
        shared = self.shared_experts(shared_input)  # (B, m_s, e)
        outs: List[Tensor] = []
        gates: List[Tensor] = []
        all_experts: List[Tensor] = []
        for i, (experts, gate) in enumerate(zip(self.task_experts, self.task_gates)):
            own = experts(task_inputs[i])  # (B, m_t, e)
            all_experts.append(own)
            h, g = gate.forward_with_weights(task_inputs[i], torch.cat([own, shared], dim=1))  # (B, e), (B, m_t+m_s)
            outs.append(h)
            gates.append(g)
        shared_out = shared_input
        all_experts.append(shared)
        for gate in self.shared_gate:
            shared_out, g = gate.forward_with_weights(shared_input, torch.cat(all_experts, dim=1))  # (B, e)
            gates.append(g)  # (B, T*m_t + m_s)
        return outs, shared_out, gates


class PLEHead(nn.Module):
    """Progressive layered extraction + one tower per task.

    Args:
        in_dim: width of the concatenated field embeddings.
        num_tasks: number of tasks T.
        num_levels: number of extraction levels L (1 = CGC).
        num_shared: shared experts per level (the paper: 2).
        num_task: experts per task and level (the paper: 2).
        expert_dims: hidden sizes of every expert.
        tower_dims: hidden sizes of every task tower.
        dropout: dropout probability after each hidden layer.

    Example:
        head = PLEHead(40, 3, 2, 2, 2, [32], [32, 16], 0.0)
        logits, gates = head.forward_with_gates(torch.randn(8, 40))  # (8, 3), gate weights of every level
    """

    def __init__(self, in_dim: int, num_tasks: int, num_levels: int, num_shared: int, num_task: int,
                 expert_dims: List[int], tower_dims: List[int], dropout: float) -> None:
        super().__init__()
        levels: List[nn.Module] = []
        width = in_dim
        for level in range(num_levels):
            cgc = CGCLevel(width, num_tasks, num_shared, num_task, expert_dims, dropout,
                           shared_gate=level < num_levels - 1)
            levels.append(cgc)
            width = cgc.out_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleList(
            [nn.Sequential(MLP(width, tower_dims, dropout), nn.Linear(tower_dims[-1], 1)) for _ in range(num_tasks)]
        )
        self.num_tasks = num_tasks

    def forward_with_gates(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """Logits (B, T) and the gate weights of every level in order (per level: T task gates, then the shared
        gate of an intermediate level)."""
        task_inputs: List[Tensor] = [x for _ in range(self.num_tasks)]  # T x (B, in_dim)
        shared_input = x  # (B, in_dim)
        gates: List[Tensor] = []
        for level in self.levels:
            task_inputs, shared_input, level_gates = level(task_inputs, shared_input)  # T x (B, e), (B, e)
            gates.extend(level_gates)
        logits: List[Tensor] = []
        for i, tower in enumerate(self.towers):
            logits.append(tower(task_inputs[i]).squeeze(-1))  # (B,)
        return torch.stack(logits, dim=1), gates  # (B, T)

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


@register_model("ple")
def build_ple(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return PLEHead(in_dim, num_tasks, cfg.num_levels, cfg.num_shared_experts, cfg.num_task_experts,
                   cfg.expert_dims, cfg.tower_dims, cfg.dropout)
