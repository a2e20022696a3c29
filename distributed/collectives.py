"""Small collectives the trainer needs: the curriculum broadcast and step-count agreement.

These are not in any library as one call: each is a thin, typed wrapper over one torch.distributed collective.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _dev() -> torch.device:
    """nccl moves only CUDA tensors; gloo only CPU ones."""
    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_float(value: Optional[float], src: int = 0) -> float:
    """Rank `src` provides `value`; every rank returns the value rank `src` sent (float64, so bit-exact)."""
    if not _active():
        if value is None:
            raise ValueError("broadcast_float without a process group needs a value")
        return float(value)
    t = torch.tensor([0.0 if value is None else float(value)], dtype=torch.float64, device=_dev())
    if dist.get_rank() == src and value is None:
        raise ValueError(f"rank {src} must provide the value to broadcast")
    dist.broadcast(t, src=src)
    return float(t.item())


def _reduce_int(n: int, op) -> int:
    if not _active():
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=_dev())
    dist.all_reduce(t, op=op)
    return int(t.item())


def agree_min(n: int) -> int:
    """Training steps per epoch: every rank must run the same count (gloo crashes or hangs otherwise)."""
    return _reduce_int(n, dist.ReduceOp.MIN if _active() else None)


def agree_max(n: int) -> int:
    """Evaluation steps: ranks with fewer rows run padding batches so all cover their whole split."""
    return _reduce_int(n, dist.ReduceOp.MAX if _active() else None)


def all_reduce_sum(values: List[float]) -> List[float]:
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_dev())
    dist.all_reduce(t)
    return t.tolist()


def gather_floats(value: float) -> List[float]:
    """Every rank's `value`, in rank order (on every rank)."""
    if not _active():
        return [float(value)]
    t = torch.tensor([float(value)], dtype=torch.float64, device=_dev())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def any_rank(flag: bool) -> bool:
    """True on every rank if any rank passes True (e.g. a NaN loss seen on one rank stops all of them together)."""
    return _reduce_int(int(flag), dist.ReduceOp.MAX if _active() else None) > 0


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (e.g. which checkpoint to restore: one decision for all)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, in rank order (on every rank)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _active():
        dist.barrier()
