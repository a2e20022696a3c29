"""Runs that survive: a worker process really killed mid-epoch, resume with another worker count, no secret leaks.

All compare against the session's reference run (tests/conftest.py::trained_run, same seed and settings).
"""

import glob
import json
import os

import pytest
import torch

from tests.conftest import E2E_ARGS, E2E_EPOCHS, FAKE_WANDB_KEY, run_cli


def _aucs(metrics):
    return metrics["test"]["auc"]


def test_killed_worker_restarts_from_checkpoint_and_matches(trained_run, tiny_data, tmp_path):
    _, ref, _ = trained_run
    fault = tmp_path / "fault.json"
    fault.write_text(json.dumps({"epoch": 1, "step": 10, "rank": 1}))  # rank 1 dies mid-epoch 2 (SIGKILL)
    run_dir = str(tmp_path / "killed")
    proc = run_cli(["launch/train.py", f"data.path={tiny_data}", f"run.dir={run_dir}", *E2E_ARGS,
                    "train.max_failures=1", "run.keep_checkpoints=1"], env_extra={"PIMM_FAULT_INJECT": str(fault)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert not fault.exists()  # the hook fired (it consumes the file before the kill)
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["restarts"] == 1  # one restored worker group, from the run's own records
    assert metrics["sharding_plan"] == ref["sharding_plan"]  # the restarted group planned the same sharding
    # no epoch repeated or skipped, the curriculum continued where it was
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(E2E_EPOCHS))
    assert [e["p"] for e in metrics["epochs"]] == [e["p"] for e in ref["epochs"]]
    # epoch 0 ran before the fault in a separate process: same seed -> same data order, initialisation and plan,
    # so it must match the reference run exactly
    assert metrics["epochs"][0]["train_loss"] == ref["epochs"][0]["train_loss"]
    assert metrics["epochs"][0]["valid"]["auc"] == ref["epochs"][0]["valid"]["auc"]
    for task in ref["test"]["auc"]:
        assert abs(_aucs(metrics)[task] - _aucs(ref)[task]) <= 0.002, (task, _aucs(metrics), _aucs(ref))
    # retention: the newest checkpoint and the best one survive, nothing else
    kept = sorted(d for d in os.listdir(run_dir) if d.startswith("epoch_"))
    assert kept == sorted({f"epoch_{E2E_EPOCHS - 1:03d}", f"epoch_{metrics['best_epoch']:03d}"}), kept
    # both attempts' offline W&B data are kept, under the same run id
    attempts = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))
    assert len(attempts) == 2 and len({a.rsplit("-", 1)[1] for a in attempts}) == 1, attempts


def test_resume_on_one_worker_gives_the_same_outputs(trained_run, tmp_path):
    ref_dir, ref, _ = trained_run
    run_dir = str(tmp_path / "resumed")
    proc = run_cli(["launch/train.py", "--resume", ref_dir, f"data.path={ref['data_path']}" if "data_path" in ref
                    else f"data.path={json.load(open(os.path.join(ref_dir, 'model.json')))['data_spec']}",
                    f"run.dir={run_dir}", *E2E_ARGS, "train.num_workers=1", "wandb.mode=disabled"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "saved by 2 workers, now 1" in out
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert metrics["world_size"] == 1 and metrics["best_epoch"] == ref["best_epoch"]
    for task in ref["test"]["auc"]:
        assert metrics["test"]["auc"][task] == pytest.approx(ref["test"]["auc"][task], abs=1e-6)
        assert metrics["test"]["logloss"][task] == pytest.approx(ref["test"]["logloss"][task], abs=1e-6)
    # the exported models of the 2-worker and the resumed 1-worker run score identically
    batch = torch.load(os.path.join(run_dir, "export_reference.pt"), weights_only=True)
    a = torch.jit.load(os.path.join(ref_dir, "model.pt")).forward_jagged(batch["values"], batch["lengths"])
    b = torch.jit.load(os.path.join(run_dir, "model.pt")).forward_jagged(batch["values"], batch["lengths"])
    assert float((a - b).abs().max()) <= 1e-6


def test_wandb_key_never_written(trained_run):
    run_dir, _, out = trained_run
    assert FAKE_WANDB_KEY not in out
    needle = FAKE_WANDB_KEY.encode()
    for path in glob.glob(os.path.join(run_dir, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert needle not in f.read(), f"the W&B API key leaked into {path}"


def test_nan_loss_stops_naming_epoch_step_task_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path):
    fault = tmp_path / "nan.json"
    fault.write_text(json.dumps({"kind": "nan", "epoch": 1, "step": 5, "rank": 0, "task": "conversion"}))
    run_dir = str(tmp_path / "nan")
    proc = run_cli(["launch/train.py", f"data.path={tiny_data}", f"run.dir={run_dir}", "train.epochs=3",
                    "train.batch_size=512", "wandb.mode=disabled"], env_extra={"PIMM_FAULT_INJECT": str(fault)})
    assert proc.returncode == 1
    # conversion's NaN label also reaches core_conversion through its PIM input (y* = the label with probability p)
    assert "training failed: " in proc.stderr, proc.stderr[-4000:]
    assert "non-finite loss at epoch 1, step 5, task(s) ['conversion'" in proc.stderr, proc.stderr[-4000:]
    from distributed.checkpoint import verify_checkpoint

    assert sorted(d for d in os.listdir(run_dir) if d.startswith("epoch_")) == ["epoch_000"]  # nothing after it
    verify_checkpoint(os.path.join(run_dir, "epoch_000"))  # the last good one is intact
