"""A local Ray cluster for tests: a head (and optionally more nodes) started with `ray start`, on loopback, with a
free port for every service (Ray's fixed defaults collide with any other Ray on the machine) and a session folder of
its own, so that stopping it touches only its own processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _service_ports() -> list:
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]


class LocalRayCluster:
    def __init__(self):
        self.bindir = os.path.dirname(sys.executable)
        self.ray = os.path.join(self.bindir, "ray")
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=self.bindir + os.pathsep + os.environ["PATH"])
        self.env.pop("RAY_ADDRESS", None)
        # short: Ray's unix socket paths under it must stay below 108 bytes
        self.temp = tempfile.mkdtemp(prefix="pimmray-", dir="/tmp")
        self.port = free_port()
        self.dashboard = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def _start(self, args):
        proc = subprocess.run([self.ray, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args,
                               *_service_ports()], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def start_head(self, num_cpus: int, resources: dict | None = None):
        self._start(["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard}",
                     "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={self.temp}",
                     f"--ray-client-server-port={free_port()}", f"--resources={json.dumps(resources or {})}"])
        deadline = time.time() + 60  # the job API answers a few seconds after `ray start` returns
        while subprocess.run([self.ray, "job", "list", "--address", self.address], env=self.env, capture_output=True,
                             timeout=60).returncode != 0:
            assert time.time() < deadline, "the Ray job API did not come up within 60 s"
            time.sleep(1)

    def add_node(self, num_cpus: int, resources: dict | None = None):
        self._start([f"--address=127.0.0.1:{self.port}", f"--num-cpus={num_cpus}",
                     f"--resources={json.dumps(resources or {})}"])

    def submit(self, entrypoint: list, timeout: int = 600) -> subprocess.CompletedProcess:
        cmd = [self.ray, "job", "submit", "--address", self.address, "--", *entrypoint]
        for _ in range(10):  # the dashboard refuses submissions until its job agent has registered; nothing ran then
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
            if "No available agent to submit job" not in proc.stdout + proc.stderr:
                return proc
            time.sleep(2)
        return proc

    def stop(self) -> None:
        """`ray stop` for this cluster only: every process whose command line names its session folder gets SIGTERM,
        then SIGKILL after a grace period (as `ray stop` does), leaving any other Ray on the machine alone."""
        subprocess.run(["pkill", "-TERM", "-f", self.temp], capture_output=True)
        deadline = time.time() + 10
        while time.time() < deadline:
            if subprocess.run(["pgrep", "-f", self.temp], capture_output=True).returncode != 0:
                break
            time.sleep(0.5)
        subprocess.run(["pkill", "-KILL", "-f", self.temp], capture_output=True)
        subprocess.run(["rm", "-rf", self.temp])
