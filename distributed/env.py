"""Device, backend and the rank-0 gate. No model math here."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def device_for(local_rank: int, use_gpu: bool) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but CUDA is not available on this worker; install the GPU stack "
                               "(scripts/setup_env.sh gpu) or set train.use_gpu=false")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def current_env(use_gpu: bool) -> WorkerEnv:
    """The env of this process; the process group must already exist (Ray Train's TorchConfig creates it)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return WorkerEnv(rank, world, local_rank, device_for(local_rank, use_gpu), backend_for(use_gpu))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (the kernel's high-water mark: ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_intra_op_threads(n: int) -> None:
    """One worker per core by default: more intra-op threads than cores makes the workers fight over them."""
    torch.set_num_threads(max(1, n))
