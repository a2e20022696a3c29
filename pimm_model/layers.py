"""Building blocks of the task towers: the MLP and the attention of eq. (1)-(3)."""

import math
from typing import List, Tuple

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """Stack of Linear + ReLU (+ Dropout) layers.

    Args:
        in_dim: input width.
        dims: output width of each layer (an empty list makes the identity).
        dropout: dropout probability after each layer (no Dropout module when 0).
    """

    def __init__(self, in_dim: int, dims: List[int], dropout: float) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        prev = in_dim
        for h in dims:
            layers.append(nn.Linear(prev, h))
            layers.append(nn.ReLU())
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            prev = h
        self.layers = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, in_dim) -> (B, out_dim)


class AttentionTransfer(nn.Module):
    """Self-attention with residual over the task's own tower output and the merged prior, eq. (1)-(3).

    The score of each input uses the query and the key of that same input (as in AITM's official code).

    Args:
        d: width of both inputs and of the output.
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.scale = 1.0 / math.sqrt(d)

    def forward_with_weights(self, v: Tensor, zm: Tensor) -> Tuple[Tensor, Tensor]:
        """Returns U (B, d) and the attention weights (B, 2) over (v, zm)."""
        a = torch.stack([v, zm], dim=1)  # (B, 2, d): the two inputs a in {v_t, Z^m_{t-1}}
        q, k, val = self.q(a), self.k(a), self.v(a)  # (B, 2, d) each
        scores = (q * k).sum(dim=-1) * self.scale  # (B, 2)  eq. (2): Q(a)·K(a) / sqrt(d)
        w = torch.softmax(scores, dim=1)  # (B, 2)  eq. (3)
        u = v + (w.unsqueeze(-1) * val).sum(dim=1)  # (B, d)  eq. (1)
        return u, w

    def forward(self, v: Tensor, zm: Tensor) -> Tensor:
        u, _ = self.forward_with_weights(v, zm)
        return u  # (B, d)
