"""Checkpoint manifests: a checkpoint is valid only when every rank's manifest is present and every file matches
its sha256; anything else is refused with the file named, before any state is loaded."""

import json
import os

import pytest
import torch
from torch import nn

from distributed.checkpoint import CheckpointError, load_unsharded, save_checkpoint, verify_checkpoint


class _Opt:  # the KeyedOptimizer surface save_checkpoint uses
    def __init__(self, model):
        self.opt = torch.optim.Adam(model.parameters(), lr=0.1)

    def state_dict(self):
        return self.opt.state_dict()


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = _Opt(model)
    model(torch.randn(3, 4)).sum().backward()
    opt.opt.step()
    path = str(tmp_path / "epoch_000")
    save_checkpoint(path, model, opt, {"epoch": 0, "best_epoch": 0})
    return path, model


def test_round_trip_and_manifest(ckpt):
    path, model = ckpt
    verify_checkpoint(path)
    manifest = json.load(open(os.path.join(path, "manifest.rank0.json")))
    assert {"train_state.json", ".metadata"} <= set(manifest["files"])
    assert any(f.endswith(".distcp") for f in manifest["files"])
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    load_unsharded(path, fresh)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


def _shard(path):
    return os.path.join(path, next(f for f in os.listdir(path) if f.endswith(".distcp")))


def test_truncated_file_is_refused(ckpt):
    path, model = ckpt
    shard = _shard(path)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=os.path.basename(shard)):
        load_unsharded(path, model)


def test_flipped_byte_is_refused(ckpt):
    path, _ = ckpt
    shard = _shard(path)
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        verify_checkpoint(path)


def test_missing_rank_manifest_means_incomplete(ckpt):
    path, _ = ckpt
    state = json.load(open(os.path.join(path, "train_state.json")))
    state["world_size"] = 2  # as if rank 1's upload never finished
    json.dump(state, open(os.path.join(path, "train_state.json"), "w"))
    with pytest.raises(CheckpointError, match="manifest.rank1.json is missing"):
        verify_checkpoint(path)


def test_stray_shard_is_refused(ckpt):
    path, _ = ckpt
    open(os.path.join(path, "__7_0.distcp"), "wb").write(b"x")
    with pytest.raises(CheckpointError, match="__7_0.distcp"):
        verify_checkpoint(path)
