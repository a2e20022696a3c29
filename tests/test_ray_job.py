"""`ray start --head` + `ray job submit -- python launch/train.py ...`: the way users run pimm on a cluster; and a
real two-node cluster on this machine, with the two workers placed on different nodes and a shared storage path.

Local test clusters run with token auth disabled (a local `ray.init()` elsewhere writes a token that a later
`ray start` would demand), and only their own processes are stopped afterwards.
"""

import json
import os

import pytest

from tests.ray_cluster import LocalRayCluster


@pytest.fixture
def cluster():
    c = LocalRayCluster()
    try:
        yield c
    finally:
        c.stop()


def test_ray_job_submit_trains_and_exports(cluster, tiny_data, tmp_path):
    cluster.start_head(num_cpus=2)
    run_dir = str(tmp_path / "job-run")
    proc = cluster.submit(["python", "launch/train.py", f"data.path={tiny_data}", f"run.dir={run_dir}",
                           "train.epochs=1", "train.batch_size=512", "wandb.mode=disabled"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "succeeded" in out
    for name in ("metrics.json", "model.pt", "model.json", "epoch_000"):
        assert os.path.exists(os.path.join(run_dir, name)), name


def test_two_node_run_places_one_worker_per_node(cluster, tiny_data, tmp_path):
    cluster.start_head(num_cpus=2, resources={"head_node": 1})
    cluster.add_node(num_cpus=1, resources={"second_node": 1})
    run_dir, shared = str(tmp_path / "mn-run"), str(tmp_path / "shared-storage")
    proc = cluster.submit(["python", "launch/train.py", f"data.path={tiny_data}", f"run.dir={run_dir}",
                           f"run.storage_path={shared}", "train.placement_strategy=STRICT_SPREAD",
                           "train.epochs=2", "train.batch_size=512", "wandb.mode=disabled"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    nodes = [w["node_id"] for w in metrics["workers"]]
    assert len(nodes) == 2 and nodes[0] != nodes[1], metrics["workers"]  # one worker per Ray node
    for epoch in metrics["epochs"]:  # the curriculum p reached the worker on the other node
        assert epoch["p_received_by_rank"] == [epoch["p"]] * 2
    store = os.path.join(shared, os.path.basename(run_dir))
    assert metrics["storage"] == store
    for name in ("epoch_000", "epoch_001", "metrics.json", "model.pt", "model.json"):
        assert os.path.exists(os.path.join(store, name)), name
    assert not any(d.startswith("epoch_") for d in os.listdir(run_dir))  # checkpoints went to the shared storage
