import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny, strongly learnable synthetic chain for the end-to-end runs: 3 tasks, uneven shards (3 test files on 2 ranks).
TINY_SYNTHETIC = dict(
    tasks=["click", "conversion", "core_conversion"],
    fields={"customer": 400, "fund": 60, "campaign": 12, "channel": 5, "hour": 24},
    rows_train=24000, rows_valid=4000, rows_test=6000, rows_per_file=2000, row_group_rows=500,
    base_rates=[0.3, 0.4, 0.5], shared_effect=1.5, task_effect=0.8, interaction=0.3, seed=3,
)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from data_pipeline.synthetic import SyntheticConfig, generate

    out = str(tmp_path_factory.mktemp("data") / "tiny")
    generate(SyntheticConfig(**TINY_SYNTHETIC), out, progress=False)
    return out


def run_cli(args, env_extra=None, timeout=600, cwd=REPO):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true", RAY_DEDUP_LOGS="0")
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


E2E_EPOCHS = 3
# The reference 2-worker run: the e2e, failure and resume tests all compare against this one run.
# replicate_max_mb=0.005: the 400-id customer table (12.5 KiB) is sharded, the small ones replicated: both paths run.
E2E_ARGS = [f"train.epochs={E2E_EPOCHS}", "train.batch_size=256", "train.log_every=20", "train.patience=5",
            "wandb.mode=offline", "model.embedding_dim=5", "model.tower_dims=[64,32]", "train.lr=0.003",
            "train.sparse_lr=0.05", "curriculum.alpha=0.6666666666666666", "curriculum.speed=0.3333333333333333",
            "curriculum.beta=0", "seed=1", "train.replicate_max_mb=0.005"]
FAKE_WANDB_KEY = "pimmtestsecret0123456789abcdef0123456789ab"  # must never appear in any file a run writes


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    import json

    run_dir = str(tmp_path_factory.mktemp("runs") / "e2e")
    proc = run_cli(["launch/train.py", f"data.path={tiny_data}", f"run.dir={run_dir}", *E2E_ARGS],
                   env_extra={"WANDB_API_KEY": FAKE_WANDB_KEY})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    return run_dir, metrics, proc.stdout + proc.stderr
