"""Sharded checkpoints with torch.distributed.checkpoint (DCP), and the unsharded load used for export.

Layout of one checkpoint folder (one per epoch, persisted by Ray Train, which merges the ranks' files):
    .metadata, __<rank>_0.distcp   DCP: {"model": <sharded state dict>, "optim": <sparse + dense optimizer state>}
    train_state.json               written by rank 0: epoch, curriculum p, best epoch/score, history, world size
    manifest.rank<r>.json          written by each rank: sha256 and size of every file that rank wrote
DCP reshards on load, so a checkpoint written by N ranks loads into M ranks, or into one plain process for export.

A checkpoint is valid only when the manifests of all ranks are present and every listed file matches its hash: a
crash while saving or uploading leaves a folder that fails `verify_checkpoint` with a message naming the file, never
one that loads half-written state.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

TRAIN_STATE_FILE = "train_state.json"
MANIFEST_PREFIX = "manifest.rank"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save_checkpoint(path: str, model: nn.Module, optimizer: Any, train_state: Dict[str, Any]) -> None:
    """Collective: every rank writes its shards into `path` (a rank-local folder is fine: Ray merges them), then
    its manifest (sha256 of the files it wrote). The folder must be empty or new: what it holds is what this rank
    wrote."""
    os.makedirs(path, exist_ok=True)
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=path)
    rank = _rank()
    if rank == 0:
        tmp = os.path.join(path, TRAIN_STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({**train_state, "world_size": _world()}, f, indent=1)
        os.replace(tmp, os.path.join(path, TRAIN_STATE_FILE))
    files = sorted(f for f in os.listdir(path) if not f.startswith(MANIFEST_PREFIX) and not f.endswith(".tmp"))
    manifest = {"rank": rank, "world_size": _world(),
                "files": {f: {"sha256": _sha256(os.path.join(path, f)),
                              "bytes": os.path.getsize(os.path.join(path, f))} for f in files}}
    tmp = os.path.join(path, f"{MANIFEST_PREFIX}{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(path, f"{MANIFEST_PREFIX}{rank}.json"))


def prune_checkpoints(root: str, keep_last: int, keep: Optional[str], prefix: str = "epoch_") -> List[str]:
    """Delete all `<root>/<prefix>*` folders but the newest `keep_last` and the one named `keep` (the best epoch,
    which the final evaluation and the export read). `keep_last` 0 keeps everything. Returns what was deleted."""
    from distributed import storage  # local import: storage is a leaf module, checkpoint must not need pyarrow.fs

    if keep_last <= 0:
        return []
    names = [d for d in storage.list_dirs(root) if d.startswith(prefix)]
    protected = set(names[-keep_last:]) | ({os.path.basename(keep.rstrip("/"))} if keep else set())
    doomed = [n for n in names if n not in protected]
    for name in doomed:
        storage.delete_dir(storage.join(root, name))
    return doomed


def latest_valid_checkpoint(root: str, prefix: str = "epoch_") -> Optional[str]:
    """The newest `<root>/<prefix>*` folder whose manifests are complete (sizes checked; hashes are checked when it
    is loaded), skipping any left half-written by a crash. None when there is none."""
    if not os.path.isdir(root):
        return None
    for name in sorted((d for d in os.listdir(root) if d.startswith(prefix)), reverse=True):
        try:
            verify_checkpoint(os.path.join(root, name), ranks=[])
            return os.path.join(root, name)
        except (CheckpointError, FileNotFoundError, ValueError, KeyError):
            continue
    return None


def verify_checkpoint(path: str, ranks: Optional[List[int]] = None) -> None:
    """Check the manifests of a checkpoint folder: every writing rank's manifest present, every listed file present
    with its recorded size and sha256, no unlisted shard file. `ranks` limits the hashing to those ranks' files (to
    share the work across readers); the presence checks always cover all. Raises CheckpointError naming the file."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    state = read_train_state(path)
    world = int(state.get("world_size", 0))
    listed: Dict[str, Dict[str, Any]] = {}
    owner: Dict[str, int] = {}
    for r in range(world):
        mpath = os.path.join(path, f"{MANIFEST_PREFIX}{r}.json")
        if not os.path.exists(mpath):
            raise CheckpointError(f"checkpoint {path} is incomplete: {os.path.basename(mpath)} is missing (a rank's "
                                  "save or upload did not finish); resume from an earlier checkpoint")
        with open(mpath) as f:
            files = json.load(f)["files"]
        listed.update(files)
        owner.update({name: r for name in files})
    for name in os.listdir(path):
        if name.endswith(".distcp") and name not in listed:
            raise CheckpointError(f"checkpoint {path}: {name} is not in any manifest (left by another save?)")
    for name, meta in listed.items():
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath):
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if os.path.getsize(fpath) != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {os.path.getsize(fpath)} bytes, the manifest says "
                                  f"{meta['bytes']} (truncated or corrupted); resume from an earlier checkpoint")
        if (ranks is None or owner[name] in ranks) and _sha256(fpath) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: sha256 of {name} does not match its manifest (corrupted); "
                                  "resume from an earlier checkpoint")


def read_train_state(path: str) -> Dict[str, Any]:
    file = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"checkpoint {path} has no {TRAIN_STATE_FILE}: it is incomplete or not a pimm "
                                "checkpoint; pick another checkpoint folder")
    with open(file) as f:
        return json.load(f)


def _verify_collectively(path: str) -> None:
    """Every rank hashes a share of the files; a failure anywhere stops every rank with the same message."""
    err = ""
    try:
        world_saved = int(read_train_state(path).get("world_size", 1))
        verify_checkpoint(path, ranks=list(range(_rank(), world_saved, _world())))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        err = str(e)
    if dist.is_initialized():
        errors: List[Optional[str]] = [None] * _world()
        dist.all_gather_object(errors, err)
        err = next((e for e in errors if e), "")
    if err:
        raise CheckpointError(err)


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[Any] = None) -> Dict[str, Any]:
    """Collective: verify, then restore model (and optimizer, when given) in place from `path`; returns the train
    state."""
    _verify_collectively(path)
    state: Dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        # Lazily created state (dense Adam moments) must exist to be loaded into; the dummy step this runs changes
        # nothing that survives, since parameters and state are overwritten just below.
        optimizer.init_state()
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
        optimizer.zero_grad()
    return read_train_state(path)


def load_unsharded(path: str, module: nn.Module) -> None:
    """Load the model part of a sharded checkpoint into a plain, unsharded `module` in this single process (no
    process group). `module` must have the state-dict keys of the module that was sharded. The checkpoint is
    verified against its manifests first."""
    verify_checkpoint(path)
    state = {"model": module.state_dict()}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    module.load_state_dict(state["model"])
