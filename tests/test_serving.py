"""The serving artifact of a run on prepared data (vocabularies, hashing, a bag field, missing values), exported
through the real export_run path: raw values of the ORIGINAL table score exactly like the trained model on the
prepared split; model.json describes the files; a torch-only process loads both files; a wrong model is refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.raw_inputs import fields_from_card, table_to_inputs
from launch.export import ARTIFACT_FILES, export_run
from tests.serving_util import FEATURES, TASKS, eager_probs, fake_run, prepared_data


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("serving"))
    paths = prepared_data(root)
    run_dir = fake_run(paths["data"], os.path.join(root, "run"))
    card = export_run(run_dir, progress=False)
    return paths, run_dir, card


def test_card_describes_the_artifact(exported):
    paths, run_dir, card = exported
    assert card == json.load(open(os.path.join(run_dir, "model.json")))
    assert card["format_version"] == 2 and card["tasks"] == TASKS and card["model"] == "pimm"
    assert [f["name"] for f in card["fields"]] == FEATURES
    kinds = {f["name"]: (f["encoding"]["kind"], f["value_type"], f["multi_valued"]) for f in card["fields"]}
    assert kinds == {"segment": ("vocab", "string", False), "fund": ("vocab", "int64", False),
                     "region": ("hash", "int64", False), "device": ("hash", "string", False),
                     "tags": ("vocab", "string", True)}
    seg = card["fields"][0]["encoding"]
    assert seg["null_index"] == seg["vocab_size"] + 1  # missing segment is frequent: its own index
    for name in ("model.pt", "model.pt2"):
        import hashlib

        assert card["files"][name]["sha256"] == hashlib.sha256(open(os.path.join(run_dir, name), "rb").read()
                                                               ).hexdigest()
    assert card["torch"]["exported_with"] == torch.__version__
    assert card["training"]["config"]["model"]["name"] == "pimm" and card["training"]["metrics"]["best_epoch"] == 0
    parity = card["parity"]
    assert parity["rows"] == 1500 and parity["rows_torch_export"] > 100  # the whole test split; one-value rows
    assert max(parity["max_abs_diff"].values()) <= 1e-6 and card["export_max_abs_diff"] <= 1e-6
    assert not [f for f in os.listdir(run_dir) if ".tmp-" in f]


def test_raw_table_scores_like_the_trained_model(exported):
    """The test rows as they were BEFORE data preparation -> model.pt == eager torchrec model on the prepared ids."""
    paths, run_dir, card = exported
    table = pq.read_table(paths["test"])
    inputs = table_to_inputs(table, fields_from_card(card), bytes.fromhex(card["string_key"]["key_hex"]))
    assert not inputs.dense and inputs.missing.any()  # a bag field; nulls present
    m = torch.jit.load(os.path.join(run_dir, "model.pt"))
    with torch.no_grad():
        out = m.forward_raw_jagged(*inputs.torch_args())
    got = np.stack([out[t].numpy() for t in TASKS], 1)
    expected = eager_probs(run_dir)
    assert got.shape == expected.shape == (1500, 3)
    assert np.abs(got - expected).max() <= 1e-6
    # the dense entry on the rows whose bag holds one value; model.pt2 the same
    one = table.column("tags").to_pylist()
    rows = np.array([i for i, b in enumerate(one) if b is not None and len(b) == 1])
    dense = table_to_inputs(table.take(rows).drop_columns(["tags"]).append_column(
        "tags", table.take(rows).column("tags").combine_chunks().flatten()),
        [f if f.name != "tags" else type(f)("tags", f.value_type, False) for f in fields_from_card(card)],
        bytes.fromhex(card["string_key"]["key_hex"]))
    assert dense.dense
    program = torch.export.load(os.path.join(run_dir, "model.pt2")).module()
    with torch.no_grad():
        for outs in (m(*dense.torch_args()), program(*dense.torch_args())):
            got = np.stack([outs[t].numpy() for t in TASKS], 1)
            assert np.abs(got - expected[rows]).max() <= 1e-6


def test_artifact_loads_in_a_torch_only_process(exported, tmp_path):
    paths, run_dir, card = exported
    raw = torch.tensor([[1, -5, 3, 4, 5], [0, 0, 0, 0, 0]])
    torch.save({"raw": raw, "missing": torch.tensor([[True] + [False] * 4, [False] * 5])}, tmp_path / "in.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path = [p for p in sys.path if p not in ("", {os.getcwd()!r})]
        inputs = torch.load({str(tmp_path / "in.pt")!r})
        m = torch.jit.load({os.path.join(run_dir, "model.pt")!r})
        p = torch.export.load({os.path.join(run_dir, "model.pt2")!r}).module()
        a, b = m(inputs["raw"], inputs["missing"]), p(inputs["raw"], inputs["missing"])
        assert list(a) == list(m.tasks) == {TASKS!r} and list(m.field_names) == {FEATURES!r}
        for mod in ("torchrec", "fbgemm_gpu", "ray", "pimm_model", "data_pipeline", "launch"):
            assert mod not in sys.modules, mod
        print(max(float((a[t] - b[t]).abs().max()) for t in a))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) <= 1e-6


def test_a_wrong_model_is_refused_and_nothing_is_replaced(exported, tmp_path):
    paths, run_dir, _ = exported
    bad = str(tmp_path / "run")
    shutil.copytree(run_dir, bad)
    before = {n: open(os.path.join(bad, n), "rb").read() for n in ARTIFACT_FILES}
    ref_path = os.path.join(bad, "export_reference.pt")
    ref = torch.load(ref_path, weights_only=True)
    ref["probs"] = ref["probs"] + 1e-3  # the "trained model" scored differently
    torch.save(ref, ref_path)
    with pytest.raises(RuntimeError, match="refusing a wrong model"):
        export_run(bad, progress=False)
    assert {n: open(os.path.join(bad, n), "rb").read() for n in ARTIFACT_FILES} == before
    assert not [f for f in os.listdir(bad) if ".tmp-" in f]


def test_export_without_the_program_writes_model_pt_only(exported, tmp_path):
    """run.export_program=false / --no-program: model.pt and a card describing it alone; the model.pt2 an earlier
    export left in the folder is removed, not left beside a card that does not describe it."""
    _, run_dir, card = exported
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    assert os.path.exists(os.path.join(run, "model.pt2"))
    lean = export_run(run, progress=False, program=False)
    assert sorted(os.listdir(run)) == sorted(set(os.listdir(run_dir)) - {"model.pt2"})
    assert lean == json.load(open(os.path.join(run, "model.json")))
    assert set(lean["files"]) == {"model.pt"} and "model.pt2" not in lean["inputs"] and "model.pt2" not in lean["torch"]
    assert set(lean["parity"]["max_abs_diff"]) == {"torchscript_raw", "torchscript_indices"}
    assert lean["parity"]["rows"] == card["parity"]["rows"] and "rows_torch_export" not in lean["parity"]
    ref = torch.load(os.path.join(run, "export_reference.pt"), weights_only=True)
    full, only = (torch.jit.load(os.path.join(d, "model.pt")) for d in (run_dir, run))
    with torch.no_grad():
        torch.testing.assert_close(only.forward_jagged(ref["values"], ref["lengths"], ref.get("weights")),
                                   full.forward_jagged(ref["values"], ref["lengths"], ref.get("weights")),
                                   rtol=0, atol=0)
