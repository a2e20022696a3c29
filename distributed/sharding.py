"""Wrap the unchanged model with TorchRec's planner + DistributedModelParallel. No model math here.

The model is built with its EmbeddingBagCollection on the meta device; the planner decides where each table lives
(table_wise / column_wise / row_wise ...), given the real memory of this machine, and DMP materialises only the shards
this rank owns. Dense layers are replicated and wrapped in DDP by DMP itself — so the result must NOT be passed to
Ray's `prepare_model`.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import HardwareConfig, KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection

log = logging.getLogger(__name__)

# What fbgemm/TorchRec can run per device (row_wise needs the GPU kernels). data_parallel is not among the defaults:
# it replicates whole tables on every rank, which defeats the point for large id tables; small tables are
# replicated by size instead (train.replicate_max_mb, table_sharding_types).
SUPPORTED_SHARDING_TYPES: Dict[str, List[str]] = {
    "cpu": ["table_wise", "column_wise", "table_column_wise", "data_parallel"],
    "cuda": ["table_wise", "column_wise", "row_wise", "table_row_wise", "table_column_wise", "data_parallel"],
}
DEFAULT_SHARDING_TYPES: Dict[str, List[str]] = {
    "cpu": ["table_wise", "column_wise"],
    "cuda": ["table_wise", "column_wise", "row_wise", "table_row_wise"],
}


def allowed_sharding_types(requested: Sequence[str], device: torch.device) -> List[str]:
    kind = device.type
    if not requested:
        return list(DEFAULT_SHARDING_TYPES[kind])
    bad = [t for t in requested if t not in SUPPORTED_SHARDING_TYPES[kind]]
    if bad:
        raise ValueError(f"train.sharding_types {bad} are not supported on {kind}; "
                         f"supported there: {SUPPORTED_SHARDING_TYPES[kind]}")
    return list(requested)


def _memory_per_rank(local_world_size: int) -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(0.8 * total / max(1, local_world_size))


def find_ebcs(model: nn.Module) -> Dict[str, EmbeddingBagCollection]:
    return {name: m for name, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}


def table_bytes(cfg) -> int:
    """Bytes of one table's weights (rows x stored width x element size)."""
    return cfg.num_embeddings * cfg.embedding_dim * data_type_to_dtype(cfg.data_type).itemsize


# Sharding types that cut one table into pieces on several ranks (the others keep a table whole on one rank).
SPLITTING_TYPES = ("column_wise", "table_column_wise", "row_wise", "table_row_wise")
CW_ALIGN = 4  # TorchRec's column-wise shard widths are multiples of 4


def table_sharding_types(model: nn.Module, device: torch.device, sharding_types: Sequence[str],
                         replicate_max_bytes: int = 0, split_min_bytes: int = 0) -> Dict[str, List[str]]:
    """table name -> the sharding types the planner may use for it: ["data_parallel"] (replicated on every rank)
    for tables of at most `replicate_max_bytes`; only the splitting ones among the allowed types for tables of at
    least `split_min_bytes` (> 0), so that no single rank has to hold a big table whole (kept as allowed when none
    of the allowed types splits); else `sharding_types` (default: the device's)."""
    types = allowed_sharding_types(sharding_types, device)
    splitting = [t for t in types if t in SPLITTING_TYPES] or types
    out: Dict[str, List[str]] = {}
    for ebc in find_ebcs(model).values():
        for cfg in ebc.embedding_bag_configs():
            size = table_bytes(cfg)
            if size <= replicate_max_bytes:
                out[cfg.name] = ["data_parallel"]
            elif 0 < split_min_bytes <= size:
                out[cfg.name] = list(splitting)
            else:
                out[cfg.name] = list(types)
    return out


def column_shard_width(dim: int, world_size: int) -> int:
    """Column-wise shard width that cuts a `dim`-wide table into (about) one shard per rank: TorchRec's planner
    otherwise cuts shards of at least 128 columns (MIN_CW_DIM), i.e. ONE shard for D <= 128, so a 100 M x 16 table
    ends up whole on one rank. The widest multiple of CW_ALIGN that divides dim (TorchRec's rule) with at least
    world_size shards; dim itself (one shard) when there is none."""
    width = dim // max(1, world_size) // CW_ALIGN * CW_ALIGN  # the widest that still gives every rank a shard...
    while width > CW_ALIGN and dim % width:  # ...that divides dim
        width -= CW_ALIGN
    return width if width >= CW_ALIGN and dim % width == 0 else dim


def plan_sharding(model: nn.Module, device: torch.device, sharding_types: Sequence[str], world_size: int,
                  local_world_size: int, pg: Optional[dist.ProcessGroup] = None,
                  replicate_max_bytes: int = 0, split_min_bytes: int = 0) -> ShardingPlan:
    """Collective plan (identical on every rank) for every EmbeddingBagCollection in `model`."""
    cfgs = {cfg.name: cfg for ebc in find_ebcs(model).values() for cfg in ebc.embedding_bag_configs()}
    constraints = {
        name: ParameterConstraints(sharding_types=types,
                                   min_partition=column_shard_width(cfgs[name].embedding_dim, world_size)
                                   if 0 < split_min_bytes <= table_bytes(cfgs[name]) else None)
        for name, types in table_sharding_types(model, device, sharding_types, replicate_max_bytes,
                                                split_min_bytes).items()
    }
    mem = _memory_per_rank(local_world_size)
    hardware = HardwareConfig(ddr_cap_bytes=mem,
                              hbm_cap_bytes=torch.cuda.get_device_properties(device).total_memory
                              if device.type == "cuda" else mem)
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        hardware_config=hardware, kernel_config=KernelConfig(compute_device=device.type))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder()]
    return planner.collective_plan(model, sharders, pg or dist.GroupMember.WORLD)


def shard_model(model: nn.Module, device: torch.device, sharding_types: Sequence[str], world_size: int,
                local_world_size: int, replicate_max_bytes: int = 0,
                split_min_bytes: int = 0, ddp_bucket_mb: float = 25.0) -> DistributedModelParallel:
    """Plan + DMP. Fused embedding optimizers must already be attached (distributed.optim.apply_sparse_optimizer);
    TorchRec does not fuse them into replicated (data_parallel) tables: see distributed.optim.build_optimizer.
    `ddp_bucket_mb`: DDP's gradient bucket size for the replicated part (TorchRec's default 25 MiB puts a small
    model's gradients in ONE bucket, all-reduced only once the whole backward is done)."""
    plan = plan_sharding(model, device, sharding_types, world_size, local_world_size,
                         replicate_max_bytes=replicate_max_bytes, split_min_bytes=split_min_bytes)
    if dist.get_rank() == 0:
        log.info("sharding plan:\n%s", plan)
    return DistributedModelParallel(module=model, device=device, plan=plan,
                                    sharders=[EmbeddingBagCollectionSharder()],
                                    data_parallel_wrapper=DefaultDataParallelWrapper(bucket_cap_mb=ddp_bucket_mb))


def describe_plan(dmp: DistributedModelParallel) -> Dict[str, str]:
    """table name -> 'sharding_type@ranks', for logs and metrics.json."""
    out: Dict[str, str] = {}
    for module_plan in dmp.plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted(set(ps.ranks or []))
            out[table] = f"{ps.sharding_type}@{ranks}"
    return out
