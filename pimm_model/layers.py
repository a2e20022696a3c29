"""Building blocks of the heads: the MLP, the attention of eq. (1)-(3), experts and gates, and the chain product."""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
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
    """Self-attention over a task's own representation and a transferred one, eq. (1)-(3).

    The score of each input uses the query and the key of that same input (as in AITM's official code), and the
    softmax runs over the two inputs. PIMM (eq. (1)) adds a residual on ``v``; AITM's AIT module has none, and its
    official code projects Q, K, V without bias: ``residual=False, bias=False`` gives AITM's module.

    Args:
        d: width of both inputs and of the output.
        residual: add ``v`` to the attention output (PIMM's eq. (1)); False for AITM and MNCM.
        bias: give the Q, K and V projections a bias.

    Example:
        att = AttentionTransfer(32)
        u, w = att.forward_with_weights(torch.randn(8, 32), torch.randn(8, 32))  # (8, 32), (8, 2)
    """

    def __init__(self, d: int, residual: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.scale = 1.0 / math.sqrt(d)
        self.residual = residual

    def forward_with_weights(self, v: Tensor, zm: Tensor) -> Tuple[Tensor, Tensor]:
        """Args:
            v: (..., d) the task's own representation (v_t in PIMM, q_t in AITM).
            zm: (..., d) the transferred one (Z^m_{t-1} in PIMM, p_{t-1} in AITM).

        Returns:
            the output (..., d) and the attention weights (..., 2) over (v, zm).
        """
        a = torch.stack([v, zm], dim=-2)  # (..., 2, d): the two inputs a in {v_t, Z^m_{t-1}}
        q, k, val = self.q(a), self.k(a), self.v(a)  # (..., 2, d) each
        scores = (q * k).sum(dim=-1) * self.scale  # (..., 2)  eq. (2): Q(a)·K(a) / sqrt(d)
        w = torch.softmax(scores, dim=-1)  # (..., 2)  eq. (3)
        out = (w.unsqueeze(-1) * val).sum(dim=-2)  # (..., d)  sum_a w_a V(a)
        if self.residual:
            out = v + out  # (..., d)  eq. (1)
        return out, w

    def forward(self, v: Tensor, zm: Tensor) -> Tensor:
        u, _ = self.forward_with_weights(v, zm)
        return u  # (..., d)


class Experts(nn.Module):
    """A group of E expert MLPs reading the same input.

    Args:
        in_dim: input width.
        num: number of experts E.
        dims: hidden sizes of each expert; the output width e is the last one.
        dropout: dropout probability after each expert layer.
    """

    def __init__(self, in_dim: int, num: int, dims: List[int], dropout: float) -> None:
        super().__init__()
        self.experts = nn.ModuleList([MLP(in_dim, dims, dropout) for _ in range(num)])
        self.num = num
        self.out_dim = dims[-1] if len(dims) > 0 else in_dim

    def forward(self, x: Tensor) -> Tensor:
        outs: List[Tensor] = []
        for expert in self.experts:
            outs.append(expert(x))  # (B, e)
        return torch.stack(outs, dim=1)  # (B, E, e)


class Gate(nn.Module):
    """Softmax gate mixing expert outputs: g(x) = softmax(W x), output = sum_i g_i(x) E_i (MMoE, PLE's CGC).

    Args:
        in_dim: width of the gate's input.
        num: number of experts it mixes.
    """

    def __init__(self, in_dim: int, num: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num)

    def forward_with_weights(self, x: Tensor, experts: Tensor) -> Tuple[Tensor, Tensor]:
        """Args:
            x: (B, in_dim) the gate's input.
            experts: (B, E, e) the outputs of the experts it mixes.

        Returns:
            the mixture (B, e) and the gate weights (B, E), which sum to 1 over E.
        """
        g = torch.softmax(self.linear(x), dim=-1)  # (B, E)
        return (g.unsqueeze(-1) * experts).sum(dim=1), g  # (B, e), (B, E)

    def forward(self, x: Tensor, experts: Tensor) -> Tensor:
        out, _ = self.forward_with_weights(x, experts)
        return out  # (B, e)


def _log1mexp_neg(s: Tensor) -> Tensor:
    """log(1 - exp(-s)) for s > 0, stable at both ends (Maechler 2012): log(-expm1(-s)) for small s, else
    log1p(-exp(-s)). Each branch only sees inputs it is stable on, so the unused one adds no NaN to the gradient."""
    ln2 = torch.full_like(s, 0.6931471805599453)  # log(2), the switch point
    small = s < ln2  # (...)
    near = torch.log(-torch.expm1(-torch.where(small, s, ln2)))  # (...)
    far = torch.log1p(-torch.exp(-torch.where(small, ln2, s)))  # (...)
    return torch.where(small, near, far)


def chain_marginal_logits(cond_logits: Tensor) -> Tensor:
    """Logits of the chain marginals p_t = prod_{s<=t} q_s from the logits of the conditionals q_s (ESMM).

    Computed in fp32 from S_t = -log p_t = sum_{s<=t} softplus(-l_s), as logit(p_t) = log p_t - log(1 - p_t)
    = -S_t - log(1 - exp(-S_t)); ``sigmoid`` of the result is the product of the conditionals, and BCE-with-logits
    on it equals BCE on the product without ever forming the product.

    Args:
        cond_logits: (B, T) logits l_t of q_t = P(y_t = 1 | y_{t-1} = 1, x) (q_0 = P(y_0 = 1 | x)).

    Returns:
        (B, T) fp32 logits of the marginals; column 0 is l_0 itself.
    """
    lf = cond_logits.float()  # (B, T)
    # S_t = -log p_t, kept >= 1e-30 so that p_t < 1 strictly and logit(p_t) <= -log(1e-30) ~ 69 stays finite
    neg_log_p = torch.cumsum(F.softplus(-lf), dim=1).clamp_min(1e-30)  # (B, T)
    marginal = -neg_log_p - _log1mexp_neg(neg_log_p)  # (B, T)  log p_t - log(1 - p_t)
    return torch.cat([lf[:, :1], marginal[:, 1:]], dim=1)  # (B, T)  p_0 = q_0 exactly
