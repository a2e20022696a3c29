"""Optimizers: a fused (in-backward) optimizer for the embedding tables and Adam for the dense layers."""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, Type

import torch
from torch import nn
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

# name -> (optimizer class TorchRec maps to an fbgemm fused kernel, how lr / L2 are passed)
SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,  # EmbOptimType.ADAM: GPU only in fbgemm 1.8
    "rowwise_adagrad": RowWiseAdagrad,  # EXACT_ROWWISE_ADAGRAD: CPU and GPU, one state scalar per row
    "adagrad": torch.optim.Adagrad,  # EXACT_ADAGRAD
    "sgd": torch.optim.SGD,  # EXACT_SGD
}
CPU_SPARSE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def resolve_sparse_optimizer(name: str, use_gpu: bool) -> str:
    if name == "auto":
        return "adam" if use_gpu else "rowwise_adagrad"
    if name not in SPARSE_OPTIMIZERS:
        raise ValueError(f"train.sparse_optimizer={name!r} is not one of {['auto', *SPARSE_OPTIMIZERS]}")
    if not use_gpu and name not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(f"train.sparse_optimizer={name!r} has no fused CPU kernel in fbgemm; "
                         f"use one of {list(CPU_SPARSE_OPTIMIZERS)} (or 'auto') on CPU")
    return name


def apply_sparse_optimizer(embedding_module: nn.Module, name: str, lr: float, l2: float) -> Tuple[str, Dict[str, Any]]:
    """Attach the fused optimizer to the embedding parameters BEFORE sharding; the sharder turns it into fbgemm's
    in-backward update, so only the rows a batch touches are read, updated (and L2-decayed)."""
    kwargs: Dict[str, Any] = {"lr": lr}
    if l2 > 0:
        kwargs["weight_decay"] = l2
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[name], embedding_module.parameters(), kwargs)
    return name, kwargs


def build_optimizer(sharded: nn.Module, lr: float, weight_decay: float) -> CombinedOptimizer:
    """Adam on every parameter not handled in backward + the sharded model's fused optimizer, as one
    KeyedOptimizer so that DCP checkpoints both."""
    dense_params: Dict[str, nn.Parameter] = {
        name: p for name, p in sharded.named_parameters() if not getattr(p, "_in_backward_optimizers", None)
    }
    make: Callable = lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)  # noqa: E731
    dense = KeyedOptimizerWrapper(dense_params, make)
    return CombinedOptimizer([("sparse", sharded.fused_optimizer), ("dense", dense)])
