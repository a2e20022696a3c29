"""Run storage through pyarrow filesystems: a local folder and a file:// URI take the same code path as s3:// or
gs:// (pyarrow.fs), so both are exercised here; and checkpoint retention keeps the last K plus the best."""

import os

import pytest

from distributed import storage
from distributed.checkpoint import prune_checkpoints


@pytest.fixture(params=["path", "uri"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "path" else "file://" + str(tmp_path)


def test_write_read_list_copy(root, tmp_path):
    f = storage.join(root, "run", "epoch_000", "metrics.json")
    storage.write_bytes(f, b'{"a": 1}')
    assert storage.exists(f) and storage.read_bytes(f) == b'{"a": 1}'
    assert storage.list_dirs(storage.join(root, "run")) == ["epoch_000"]
    local, downloaded = storage.local_copy(storage.join(root, "run", "epoch_000"))
    assert os.listdir(local) == ["metrics.json"] and downloaded == storage.is_uri(root)
    up = tmp_path / "up.txt"
    up.write_text("x")
    storage.upload_file(str(up), storage.join(root, "run", "model.pt"))
    assert storage.read_bytes(storage.join(root, "run", "model.pt")) == b"x"
    assert not storage.exists(storage.join(root, "run", "nope"))


def test_prune_keeps_last_k_and_the_best(root):
    for e in range(6):
        storage.write_bytes(storage.join(root, f"epoch_{e:03d}", "train_state.json"), b"{}")
    deleted = prune_checkpoints(root, keep_last=2, keep=storage.join(root, "epoch_001"))
    assert deleted == ["epoch_000", "epoch_002", "epoch_003"]
    assert storage.list_dirs(root) == ["epoch_001", "epoch_004", "epoch_005"]
    assert prune_checkpoints(root, keep_last=0, keep=None) == []  # 0 keeps everything
