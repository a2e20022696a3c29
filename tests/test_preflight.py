"""Bad data is refused before training starts, with the file and column named (from footers; no Ray needed)."""

import os
import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from data_pipeline.preflight import DataError, preflight
from data_pipeline.spec import DatasetSpec
from tests.conftest import run_cli


@pytest.fixture
def data(tiny_data, tmp_path):
    path = str(tmp_path / "data")
    shutil.copytree(tiny_data, path)
    return path, DatasetSpec.load(path)


def test_good_data_passes(data):
    _, spec = data
    assert preflight(spec, 2) == {s: len(spec.files(s)) for s in ("train", "valid", "test")}


def test_truncated_shard(data):
    _, spec = data
    victim = spec.files("valid")[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 100)
    with pytest.raises(DataError, match=f"{victim}.*corrupt or truncated"):
        preflight(spec, 2)


def test_ids_outside_the_table(data):
    _, spec = data
    victim = spec.files("train")[1]
    table = pq.read_table(victim)
    col = table.column_names.index("fund")
    table = table.set_column(col, "fund", pc.add(table.column("fund"), 10_000))
    pq.write_table(table, victim)
    with pytest.raises(DataError, match=f"{victim}: column 'fund' holds ids .* outside the table's \\[0, 60\\)"):
        preflight(spec, 2)


def test_schema_differs_from_spec(data):
    _, spec = data
    victim = spec.files("test")[2]
    pq.write_table(pq.read_table(victim).drop_columns(["channel"]), victim)
    with pytest.raises(DataError, match=f"{victim}: missing column 'channel'"):
        preflight(spec, 2)


def test_more_workers_than_shards(data):
    _, spec = data
    with pytest.raises(DataError, match="split 'valid' has 2 shard file.* train.num_workers=3"):
        preflight(spec, 3)


def test_cli_refuses_bad_data_before_ray_starts(data, tmp_path):
    path, spec = data
    victim = spec.files("train")[0]
    with open(victim, "r+b") as f:
        f.truncate(10)
    proc = run_cli(["launch/train.py", f"data.path={path}", f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert proc.returncode == 2
    assert "data error" in proc.stderr and victim in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray instance" not in proc.stdout + proc.stderr
