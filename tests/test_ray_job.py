"""`ray start --head` + `ray job submit -- python launch/train.py ...`: the way users run pimm on a cluster.

The head is started on loopback with its own ports and token auth disabled (a local `ray.init()` elsewhere writes
a token that a later `ray start` would demand), and only that head is stopped afterwards.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_head(temp: str) -> None:
    """`ray stop` for this head only: every process whose command line names its session folder gets SIGTERM,
    then SIGKILL after a grace period (as `ray stop` does), leaving any other Ray on the machine alone."""
    subprocess.run(["pkill", "-TERM", "-f", temp], capture_output=True)
    deadline = time.time() + 10
    while time.time() < deadline and subprocess.run(["pgrep", "-f", temp], capture_output=True).returncode == 0:
        time.sleep(0.5)
    subprocess.run(["pkill", "-KILL", "-f", temp], capture_output=True)


@pytest.fixture
def ray_head(tmp_path):
    bindir = os.path.dirname(sys.executable)
    ray_bin = os.path.join(bindir, "ray")
    assert os.path.exists(ray_bin), "the venv must provide the ray CLI (ray[default])"
    # every listening service gets a free port: Ray's fixed defaults (e.g. the dashboard agent's 52365) collide with
    # any other Ray on the machine, and the job API then refuses every submission ("No available agent")
    port, dash, agent, grpc, metrics, client, renv = (_free_port() for _ in range(7))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=bindir + os.pathsep + os.environ["PATH"])
    env.pop("RAY_ADDRESS", None)
    # a session folder of its own (short: Ray's unix socket paths must stay under 108 bytes), so that stopping this
    # head cannot touch any other Ray on the machine
    temp = tempfile.mkdtemp(prefix="pimmray-", dir="/tmp")
    start = subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                            "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                            f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
                            f"--runtime-env-agent-port={renv}",
                            "--disable-usage-stats", f"--temp-dir={temp}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stdout + start.stderr
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 60  # the job API answers a few seconds after `ray start` returns
        while subprocess.run([ray_bin, "job", "list", "--address", address], env=env, capture_output=True,
                             timeout=60).returncode != 0:
            assert time.time() < deadline, "the Ray job API did not come up within 60 s"
            time.sleep(1)
        yield ray_bin, address, env
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_trains_and_exports(ray_head, tiny_data, tmp_path):
    ray_bin, address, env = ray_head
    run_dir = str(tmp_path / "job-run")
    cmd = [ray_bin, "job", "submit", "--address", address, "--", "python", "launch/train.py",
           f"data.path={tiny_data}", f"run.dir={run_dir}", "train.epochs=1", "train.batch_size=512",
           "wandb.mode=disabled"]
    for _ in range(10):  # the dashboard refuses submissions until its job agent has registered; nothing ran then
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if "No available agent to submit job" not in out:
            break
        time.sleep(2)
    assert proc.returncode == 0, out[-8000:]
    assert "succeeded" in out
    for name in ("metrics.json", "model.pt", "model.json", "epoch_000"):
        assert os.path.exists(os.path.join(run_dir, name)), name
