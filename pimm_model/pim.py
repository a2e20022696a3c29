"""Prior Information Merged (PIM) module, eq. (4)-(6)."""

from typing import Optional

import torch
from torch import Tensor, nn


class PIM(nn.Module):
    """Turns the previous task's label or prediction into a d-vector and merges it with the transferred H.

    The probability p of eq. (4) comes from outside (the curriculum schedule); this module only receives it.

    Args:
        d: width of the transferred representation H_{t-1} and of the output.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, d))  # W^{t-1} of eq. (5)
        nn.init.xavier_uniform_(self.weight)  # Glorot, the default of a TF trainable variable
        # fraction of rows that took the true label in the last training forward (a tensor: no host sync)
        self.register_buffer("last_label_fraction", torch.zeros(()), persistent=False)

    def forward(self, prev_prob: Tensor, prev_label: Optional[Tensor], h_prev: Tensor, p: float) -> Tensor:
        """Merges the explicit prior (label or prediction of task t-1) with the implicit one (H_{t-1}).

        Args:
            prev_prob: (B,) predicted probability of the previous task.
            prev_label: (B,) true label of the previous task, or None; read only in training.
            h_prev: (B, d) implicit representation H_{t-1} transferred from the previous task.
            p: probability of taking the true label for each row (eq. (4)).

        Returns:
            Z^m_{t-1} (B, d).
        """
        if self.training and prev_label is not None:
            # per row: the true label with probability p, else the previous task's prediction
            take_label = torch.rand(prev_prob.shape, device=prev_prob.device, dtype=prev_prob.dtype) < p  # (B,)
            y = torch.where(take_label, prev_label.to(prev_prob.dtype), prev_prob)  # (B,)
            with torch.no_grad():
                self.last_label_fraction.copy_(take_label.float().mean())
        else:
            y = prev_prob  # (B,) inference never reads labels
        y = y.detach()  # gradient truncation on y*: nothing flows back to the previous task through it
        z = torch.sigmoid(y.unsqueeze(-1) * self.weight)  # (B, d)  eq. (5)
        return z + h_prev  # (B, d)  eq. (6); H_{t-1} is not truncated
