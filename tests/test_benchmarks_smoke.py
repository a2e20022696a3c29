"""The cheap benchmark scripts run end to end at a tiny size and print a well-formed table and JSON with positive
rates. No timing assertions: the figures themselves live in docs/performance.md. The Ray-based benchmarks
(the trainer runs, memory scaling, big tables) are not run here."""

import json

import pytest

from tests.conftest import run_cli

TINY = ["--rows", "8000", "--rows-eval", "2000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-cache"))


def _run(script, args, tmp_path, cache):
    out = str(tmp_path / "result.json")
    proc = run_cli([f"benchmarks/{script}", *TINY, "--cache-dir", cache, "--json", out, *args], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "# environment:" in proc.stdout and "torchrec" in proc.stdout and "load average" in proc.stdout
    assert "\n| " in proc.stdout and "|---" in proc.stdout  # a table
    with open(out) as f:
        result = json.load(f)
    assert result["env"]["cores"] >= 1 and result["env"]["torch"]
    return proc.stdout, result["results"]


def test_input_pipeline(tmp_path, cache):
    out, res = _run("input_pipeline.py", ["--reps", "1", "--passes", "1", "--trainer-rate", "1000", "--profile"],
                    tmp_path, cache)
    assert set(res["medians"]) == {"raw_dataset", "raw_iter", "raw_row_groups", "reader_train", "reader_first",
                                   "reader_noshuffle"}
    assert all(v > 0 for v in res["medians"].values())
    assert res["limit"] in ("raw_dataset", "raw_iter", "raw_row_groups")
    assert res["limit"] == max((v for v in res["medians"] if v.startswith("raw")), key=res["medians"].get)
    assert {"raw", "consume"} <= set(res["verdicts"]) and res["verdicts"]["raw"]["ratio"] > 0
    assert "reader_train /" in out
    # --profile: the reader's functions by own time, shares of one profiled total
    assert res["profile"] and all(0 <= r["share"] <= 1 for r in res["profile"])
    assert sum(r["share"] for r in res["profile"]) <= 1 + 1e-9
    assert any("read_row_group" in r["function"] for r in res["profile"])


def test_optimizer_step(tmp_path, cache):
    out, res = _run("optimizer_step.py", ["--reps", "1", "--steps", "2"], tmp_path, cache)
    rows = {(r["optimizer"], r["implementation"]): r for r in res["rows"]}
    assert {impl for _, impl in rows} == {"default (for-loop on CPU)", "foreach", "fused"}
    assert all(r["us/step (median)"] > 0 for r in rows.values())
    for (_, impl), r in rows.items():  # the baseline of each optimizer is its own default implementation
        if impl.startswith("default"):
            assert r["vs default"] == 1.0


def test_plain_pytorch_prebuilt(tmp_path, cache):
    _, res = _run("trainer_vs_plain_pytorch.py", ["--variants", "b", "--reps", "1", "--steps", "3",
                                                  "--plain-batch", "512", "--threads", "1"], tmp_path, cache)
    assert list(res["medians"]) == ["b"] and res["medians"]["b"] > 0
    assert res["plain_batch"] == 512 and res["trainer_runs"] == []


def test_roofline_only(tmp_path, cache):
    # one thread: a 2-thread OpenMP region crawls when the test machine is busy, and this checks shapes, not speed
    out, res = _run("trainer_vs_roofline.py", ["--roofline-only", "--reps", "1", "--roofline-steps", "3",
                                               "--batch-size", "512", "--threads", "1", "--parallel-procs", "1"],
                    tmp_path, cache)
    variants = res["variants"]
    assert {v["kind"] for v in variants.values()} == {"fused", "ebc_adagrad"}
    assert all(v["median"] > 0 and len(v["rates"]) == 1 for v in variants.values())
    assert res["roofline_variant"] in variants and res["global_batch"] == 1024
    assert res["parallel_reference"]["median"] > 0
    assert "trainer_runs" not in res and "FULL TRAINER" not in out


def test_gpu_check_roofline_on_cpu(tmp_path, cache):
    """benchmarks/gpu_check.py's roofline path on the CPU (CI has no GPU; its trainer half needs one)."""
    out, res = _run("gpu_check.py", ["--device", "cpu", "--skip-trainer", "--reps", "1", "--steps", "3",
                                     "--batch-size", "512"], tmp_path, cache)
    assert res["device"] == "cpu" and len(res["roofline"]) == 1 and res["roofline"][0] > 0 and res["trainer"] == []
    assert "GPU check on cpu" in out


@pytest.mark.parametrize("script", ["trainer_vs_roofline.py", "trainer_vs_plain_pytorch.py", "input_pipeline.py",
                                    "memory_scaling.py", "big_tables.py", "profile_worker.py", "gpu_check.py",
                                    "export_memory.py", "optimizer_step.py"])
def test_every_script_parses_its_options(script):
    proc = run_cli([f"benchmarks/{script}", "--help"], timeout=60)  # argparse runs before any heavy import
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--json" in proc.stdout, proc.stderr[-2000:]
