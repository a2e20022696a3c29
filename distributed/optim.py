"""Optimizers: a fused (in-backward) optimizer for the embedding tables and Adam for the dense layers."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Type

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
    # a copy: TorchRec rewrites the dict it is given into fbgemm's names (learning_rate, optimizer)
    apply_optimizer_in_backward(SPARSE_OPTIMIZERS[name], embedding_module.parameters(), dict(kwargs))
    return name, kwargs


# The torch optimizer that stands in for a fused one on REPLICATED (data_parallel) tables, which TorchRec trains with
# dense gradients outside fbgemm: the same update rule, element-wise where fbgemm's is row-wise (rowwise_adagrad
# keeps one accumulator per row; torch's Adagrad one per element). Rows a batch does not touch get a zero gradient:
# Adagrad and SGD leave them unchanged, like the fused kernels (Adam's momentum still moves them, as torch's does).
REPLICATED_TABLE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "rowwise_adagrad": torch.optim.Adagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
TABLE_PARAM_MARK = "embedding_bags."  # in the name of every EmbeddingBagCollection table parameter


FUSED_DEVICES = ("cpu", "cuda")  # where torch ships fused Adam / Adagrad / SGD kernels


def fused_kwargs(params) -> Dict[str, Any]:
    """{"fused": True} when torch has a fused (one kernel for all tensors) update for these parameters: on CPU torch
    otherwise runs a Python loop over the tensors (foreach is CUDA-only by default). Dense Adam on the default model:
    1,019 -> 205 us a step, 1 thread (benchmarks/optimizer_step.py)."""
    params = list(params)
    ok = params and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if ok else {}


def build_optimizer(sharded: nn.Module, lr: float, weight_decay: float, sparse: str = "rowwise_adagrad",
                    sparse_kwargs: Optional[Dict[str, Any]] = None) -> CombinedOptimizer:
    """One KeyedOptimizer (so that DCP checkpoints every state) of: the sharded model's fused optimizer (sharded
    tables, updated inside backward), the sparse optimizer's torch counterpart with its own lr / L2
    (`sparse_kwargs`, as given to apply_sparse_optimizer) on replicated tables, and Adam on the dense layers."""
    rest = {name: p for name, p in sharded.named_parameters() if not getattr(p, "_in_backward_optimizers", None)}
    tables = {name: p for name, p in rest.items() if TABLE_PARAM_MARK in name}
    dense_params = {name: p for name, p in rest.items() if name not in tables}
    make: Callable = lambda params: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay,  # noqa: E731
                                                     **fused_kwargs(params))
    parts: List[Tuple[str, Any]] = [("sparse", sharded.fused_optimizer),
                                    ("dense", KeyedOptimizerWrapper(dense_params, make))]
    if tables:
        if sparse_kwargs is None:
            raise ValueError(f"replicated tables {sorted(tables)} need the sparse optimizer's kwargs (lr, L2)")
        cls, kwargs = REPLICATED_TABLE_OPTIMIZERS[sparse], dict(sparse_kwargs)
        parts.append(("replicated", KeyedOptimizerWrapper(
            tables, lambda params: cls(params, **kwargs, **fused_kwargs(params)))))
    return CombinedOptimizer(parts)
