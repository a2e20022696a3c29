"""launch/score.py: batch scoring of a raw customer table on Ray Data (one in-process Ray start)."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.raw_inputs import fields_from_card, table_to_inputs
from launch.export import export_run
from tests.conftest import run_cli
from tests.serving_util import TASKS, eager_probs, fake_run, prepared_data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("score"))
    paths = prepared_data(root, {"train": 2000, "valid": 300, "test": 1200})
    run_dir = fake_run(paths["data"], os.path.join(root, "run"), model="esmm")
    return paths, run_dir, export_run(run_dir, progress=False)


def test_scores_a_folder_with_top_k(exported, tmp_path):
    paths, run_dir, card = exported
    table = pq.read_table(paths["test"])
    folder = tmp_path / "customers"
    folder.mkdir()
    pq.write_table(table.slice(0, 500), str(folder / "part-0.parquet"), row_group_size=128)
    pq.write_table(table.slice(500), str(folder / "part-1.parquet"), row_group_size=128)
    out = str(tmp_path / "out" / "scores.parquet")
    proc = run_cli(["launch/score.py", "--model", run_dir, "--input", str(folder), "--out", out, "--top-k", "25",
                    "--batch-size", "300", "--no-progress"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "rows/s" in proc.stdout
    scores = pq.read_table(out)
    assert scores.column_names == ["customer_id"] + [f"p_{t}" for t in TASKS]  # id auto-detected: labels excluded
    assert scores.num_rows == 1200
    assert scores.column("customer_id").to_pylist() == table.column("customer_id").to_pylist()  # input order
    got = np.stack([scores.column(f"p_{t}").to_numpy() for t in TASKS], 1)
    assert np.abs(got - eager_probs(run_dir)).max() <= 1e-6  # as trained, from the raw values
    top = pq.read_table(str(tmp_path / "out" / "scores_top25.parquet"))
    assert top.column("rank").to_pylist() == list(range(1, 26))
    final = scores.column("p_core_conversion").to_numpy()
    order = np.lexsort((np.arange(len(final)), -final.astype(np.float64)))[:25]
    assert top.column("customer_id").to_pylist() == scores.column("customer_id").to_numpy()[order].tolist()
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]


def test_missing_error_policy_names_the_columns_before_scoring(exported, tmp_path):
    paths, run_dir, _ = exported
    out = str(tmp_path / "scores.parquet")
    proc = run_cli(["launch/score.py", "--model", run_dir, "--input", paths["test"], "--out", out,
                    "--missing", "error", "--id-column", "customer_id"], timeout=120)
    assert proc.returncode == 2
    assert "'segment'" in proc.stderr and "'region'" in proc.stderr and "of 1200 rows" in proc.stderr
    assert "'fund'" not in proc.stderr and not os.path.exists(out)
    two_ids = str(tmp_path / "two_ids.parquet")
    table = pq.read_table(paths["test"])
    pq.write_table(table.append_column("account", table.column("customer_id")), two_ids)
    proc = run_cli(["launch/score.py", "--model", run_dir, "--input", two_ids, "--out", out], timeout=120)
    assert proc.returncode == 2 and "--id-column" in proc.stderr and "'account'" in proc.stderr


def test_inputs_policies_and_type_errors(exported):
    _, run_dir, card = exported
    fields = fields_from_card(card)
    salt = bytes.fromhex(card["string_key"]["key_hex"])
    t = pa.table({"segment": pa.array(["sme", None]), "fund": pa.array(["7", "-5"]),  # ints as strings parse
                  "region": pa.array([1, 2], pa.int8()), "device": ["web", "ios"],
                  "tags": pa.array([["t1", None], None], pa.list_(pa.string()))})
    inputs = table_to_inputs(t, fields, salt)
    assert inputs.lengths.tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 2, 0]  # field-major; a null bag is empty
    assert inputs.missing.tolist() == [False, True, False, False, False, False, False, False, False, True]
    m = torch.jit.load(os.path.join(run_dir, "model.pt"))
    assert m.encode_jagged(*inputs.torch_args())[1] == card["fields"][0]["encoding"]["null_index"]
    with pytest.raises(ValueError, match="'segment' has 1 missing"):
        table_to_inputs(t, fields, salt, missing="error")
    with pytest.raises(ValueError, match="'fund'"):
        table_to_inputs(t.set_column(1, "fund", pa.array(["seven", "1"])), fields, salt)
    with pytest.raises(ValueError, match=r"no column\(s\) \['tags'\]"):
        table_to_inputs(t.drop_columns(["tags"]), fields, salt)
