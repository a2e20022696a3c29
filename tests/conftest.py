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
