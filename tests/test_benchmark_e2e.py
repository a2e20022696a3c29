"""launch/benchmark.py end to end on tiny data: real 2-worker Ray runs of pimm and esmm, a well-formed report with
the ‡ logic and three plots, then a resumed sweep that trains only what is missing, and a third call with nothing
left to run. One Ray instance for the module; each run is launch/train.py's main() in-process."""

import json
import os
import re
import time

import pytest

from launch.benchmark import main

FAST = ["train.epochs=1", "train.batch_size=512", "train.lr=0.003", "train.sparse_lr=0.05", "model.embedding_dim=4",
        "model.tower_dims=[16,8]", "model.expert_dims=[16]", "wandb.mode=disabled", "train.log_every=1000"]


@pytest.fixture(scope="module")
def ray_once():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONHASHSEED": "0"}})
    yield
    ray.shutdown()


def _png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000


def test_benchmark_runs_reports_and_resumes(ray_once, tiny_data, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["--config", "bench_fintech", "--models", "pimm,esmm", "--out", str(out), "--budgets", "1,5,10",
            f"data.path={tiny_data}", *FAST]

    # 1) one seed per model
    assert main([*args, "--seeds", "1"]) == 0
    assert "2 runs; 0 already finished, 2 to run" in capsys.readouterr().out
    first = {m: os.path.getmtime(out / "runs" / f"{m}-lr0.003-s0" / "metrics.json") for m in ("pimm", "esmm")}

    # 2) two seeds: the seed-0 runs are kept, only the seed-1 runs train
    assert main([*args, "--seeds", "2"]) == 0
    log = capsys.readouterr().out
    assert "4 runs; 2 already finished, 2 to run" in log and "run 2/2" in log and "run 3/" not in log
    for m, t in first.items():
        assert os.path.getmtime(out / "runs" / f"{m}-lr0.003-s0" / "metrics.json") == t

    res = json.loads((out / "results.json").read_text())
    tasks = ["click", "conversion", "core_conversion"]
    assert res["tasks"] == tasks and res["models"] == ["pimm", "esmm"] and res["seeds"] == [0, 1]
    for m in ("pimm", "esmm"):
        assert res["test"][m]["lr"] == 0.003 and res["test"][m]["seeds"] == [0, 1]
        for t in tasks:
            assert res["test"][m]["auc"][t]["n"] == 2 and 0.5 < res["test"][m]["auc"][t]["mean"] <= 1.0
        assert res["test"][m]["rescore_auc_max_abs_diff"] < 1e-4  # model.pt rescored == the trainer's test AUC
    md = (out / "results.md").read_text()
    pimm_row = next(line for line in md.splitlines() if line.startswith("| **pimm** |"))
    assert any(line.startswith("| esmm |") for line in md.splitlines())
    cells = pimm_row.split(" | ")[2:5]  # the three AUC cells
    for t, cell in zip(tasks, cells):
        s = res["significance"][t]
        assert s["best_baseline"] == "esmm"
        assert s["significant"] == (s["p"] is not None and s["p"] < 0.05 and s["diff"] > 0)
        assert ("‡" in cell) == s["significant"] and re.search(r"\(p=(n/a|[0-9.e-]+)\)", cell)
    assert "NOT the paper's data set" in md and "oracle (true probabilities)" in md
    # the replay: positives captured at each budget, never more than the budget or the positives
    rp = res["replay"]
    assert [b["fraction"] for b in rp["budgets"]] == [0.01, 0.05, 0.1]
    assert rp["rows"] == 6000 and 0 < rp["positives"] < 6000
    for b in rp["budgets"]:
        for m in ("pimm", "esmm"):
            assert 0 <= b["captured"][m]["mean"] <= min(b["selected_rows"], rp["positives"])
        assert set(b["pimm_lift"]) == {"esmm"}
    assert res["curves"]["pimm"]["p"] == [[pytest.approx(2 / 3)], [pytest.approx(2 / 3)]]  # eq. (4) at epoch 0
    for name in ("valid_auc.png", "curriculum_p.png", "lift_curve.png"):
        assert _png(out / name), name

    # 3) nothing left to do: no training, just the report
    start = time.perf_counter()
    assert main([*args, "--seeds", "2"]) == 0
    assert "4 runs; 4 already finished, 0 to run" in capsys.readouterr().out
    assert time.perf_counter() - start < 60

    # a finished run trained with another configuration is refused, not silently mixed in
    assert main([*args, "--seeds", "2", "train.epochs=2"]) == 2
    assert "was trained with another configuration (train.epochs: 1 (run) vs 2 (now))" in capsys.readouterr().err
