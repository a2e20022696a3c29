"""Every registered model trains in a real 2-worker Ray run (gloo, TorchRec-sharded EBC, DDP on the head) on tiny
synthetic data and beats chance clearly (test AUC > 0.6) on every task.

Kept cheap: one Ray instance for the whole module, and the driver's `main()` called in-process (it leaves an already
initialised Ray alone), so each model costs a Ray Train worker group, not a Ray start.
"""

import json
import os

import pytest

from pimm_model.registry import MODELS

COMMON = ["wandb.mode=disabled", "train.epochs=2", "train.batch_size=256", "train.patience=5", "train.lr=0.003",
          "train.sparse_lr=0.05", "model.embedding_dim=8", "model.tower_dims=[32,16]", "model.expert_dims=[32]",
          "seed=1"]
# per-model settings beyond COMMON: the linear preset's embedding size (>= the 3 tasks, so each task has its own
# weights); PIMM runs the per-step curriculum, so the every-step broadcast of p is exercised for real
EXTRA = {"linear": ["model.embedding_dim=4"],
         "pimm": ["curriculum.name=step_linear", "curriculum.alpha=0.8", "curriculum.speed=0.25",
                  "curriculum.beta=0.1"]}


@pytest.fixture(scope="module")
def ray_once():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_learns_in_a_2_worker_ray_run(name, ray_once, tiny_data, tmp_path):
    from launch.train import main

    run_dir = tmp_path / name
    rc = main([f"data.path={tiny_data}", f"run.dir={run_dir}", f"model.name={name}", *COMMON, *EXTRA.get(name, [])])
    assert rc == 0
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    aucs = metrics["test"]["auc"]
    print(f"[e2e] {name}: test AUC " + " ".join(f"{t}={a:.4f}" for t, a in aucs.items()))
    assert list(aucs) == ["click", "conversion", "core_conversion"] and metrics["world_size"] == 2
    for task, auc in aucs.items():
        assert auc > 0.6, (name, task, aucs)
    if name == "pimm":  # step_linear: p falls within each epoch, p = max(0.8 - 0.25 * (E + s / S), 0.1)
        for e in metrics["epochs"]:
            assert e["p"] == pytest.approx(0.8 - 0.25 * e["epoch"])
            assert e["p_received_by_rank"] == [e["p"], e["p"]]
            assert e["p"] - 0.25 < e["p_end"] < e["p"]
    with open(os.path.join(run_dir, "model.json")) as f:
        assert json.load(f)["export_max_abs_diff"] <= 1e-6  # the exported TorchScript model scores as trained
