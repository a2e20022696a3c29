"""Multi-task loss: the sum over tasks of the per-task binary cross-entropy over the entire space."""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def multitask_bce(logits: Tensor, labels: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Weighted BCE-with-logits of every task, computed in fp32.

    Args:
        logits: (B, T) logits.
        labels: (B, T) labels in {0, 1}.
        weights: (B,) row weights (0 for padding rows).

    Returns:
        total loss () = sum of the per-task losses, and the per-task losses (T,). Each is the weighted mean over
        rows; when the weights sum to 0 both are zeros (no NaN).
    """
    if logits.shape != labels.shape or logits.dim() != 2 or weights.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits and labels (B, T) and weights (B,), got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(weights.shape)}"
        )
    logits, labels, weights = logits.float(), labels.float(), weights.float()
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B, T)
    numerator = (bce * weights.unsqueeze(-1)).sum(dim=0)  # (T,)
    total_weight = weights.sum()  # ()
    # divide by 1 rather than 0 when there is no weight: the numerator is then 0 and no NaN reaches the grads
    denominator = torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))  # ()
    per_task = numerator / denominator  # (T,)
    return per_task.sum(), per_task


def label_constraint(logits: Tensor, weights: Tensor) -> Tensor:
    """AITM's label constraint: the mean over rows and adjacent task pairs of max(ŷ_t - ŷ_{t-1}, 0), in fp32.

    It penalises a later task predicted more likely than the one it depends on. Averaged, not summed, as in the
    official AITM code (``tf.reduce_mean``); several task pairs are averaged too, so the weight means the same
    whatever the chain length.

    Args:
        logits: (B, T) logits, tasks in chain order (T >= 2).
        weights: (B,) row weights (0 for padding rows, which are left out).

    Returns:
        the constraint (); 0 when the weights sum to 0.
    """
    if logits.dim() != 2 or logits.shape[1] < 2 or weights.shape != logits.shape[:1]:
        raise ValueError(f"expected logits (B, T >= 2) and weights (B,), got {tuple(logits.shape)}, "
                         f"{tuple(weights.shape)}")
    probs = torch.sigmoid(logits.float())  # (B, T)
    weights = weights.float()
    excess = torch.relu(probs[:, 1:] - probs[:, :-1])  # (B, T-1)  max(ŷ_t - ŷ_{t-1}, 0)
    numerator = (excess * weights.unsqueeze(-1)).sum()  # ()
    total_weight = weights.sum() * excess.shape[1]  # ()  rows x task pairs
    denominator = torch.where(total_weight > 0, total_weight, torch.ones_like(total_weight))  # ()
    return numerator / denominator
