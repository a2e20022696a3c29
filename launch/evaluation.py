"""Whole-split evaluation across all workers: per-task AUC (torchmetrics, synced over ranks, so it is the AUC of the
whole split, not an average of per-worker AUCs) and log loss."""

from __future__ import annotations

from typing import Dict, Iterable, List

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

from distributed.collectives import all_reduce_sum


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, tasks: List[str],
             device: torch.device) -> Dict[str, Dict[str, float]]:
    """`model` is the (sharded) train wrapper: model(batch) -> (loss, (task_losses, logits, labels, weights)).
    Every rank must pass the same number of batches (padding rows carry weight 0 and are left out)."""
    was_training = model.training
    model.eval()
    # metric states live on the device: their sync is a collective of the process group's backend
    aucs = [BinaryAUROC().to(device) for _ in tasks]
    bce_sum = torch.zeros(len(tasks), dtype=torch.float64, device=device)
    rows = 0.0
    for batch in batches:
        _, (_, logits, labels, weights) = model(batch.to(device, non_blocking=True))
        keep = weights > 0
        if not bool(keep.any()):
            continue
        logits, labels = logits[keep].float(), labels[keep].float()
        probs = torch.sigmoid(logits)
        for t, metric in enumerate(aucs):
            metric.update(probs[:, t], labels[:, t].long())
        bce_sum += F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(0).double()
        rows += float(keep.sum())
    if rows == 0:  # a rank with no valid row must still take part in the metric's all_gather below
        for metric in aucs:
            metric.update(torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device))
    totals = all_reduce_sum([*bce_sum.tolist(), rows])
    n = max(totals[-1], 1.0)
    out: Dict[str, Dict[str, float]] = {"auc": {}, "logloss": {}}
    for t, task in enumerate(tasks):
        # compute() gathers every rank's predictions first (an all_gather), so all ranks must call it
        out["auc"][task] = float(aucs[t].compute())
        out["logloss"][task] = totals[t] / n
    out["rows"] = {"count": totals[-1]}
    model.train(was_training)
    return out


def validation_score(metrics: Dict[str, Dict[str, float]], tasks: List[str], which: str) -> float:
    """The early-stopping score: the final task's AUC (the business target) or the sum over tasks."""
    if which == "final_auc":
        return metrics["auc"][tasks[-1]]
    return sum(metrics["auc"][t] for t in tasks)
