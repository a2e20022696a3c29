"""cluster.yaml is a valid Ray cluster launcher config (Ray's own prepare + schema validation): a CPU head, GPU
workers, and setup commands that install the project's pinned stacks through the repo's setup script, so the
versions have one source of truth (requirements/*.txt)."""

import os
import re

import pytest
import yaml

from tests.conftest import REPO


@pytest.fixture
def raw():
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def _pins(name):
    out = {}
    for line in open(os.path.join(REPO, "requirements", name)):
        m = re.match(r"^([A-Za-z0-9_.\-\[\],]+)==([^\s#]+)", line.strip())
        if m:
            out[re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
    return out


def test_passes_rays_validation(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(raw))  # raises on unknown keys, bad node types, wrong types
    assert raw["head_node_type"] in raw["available_node_types"]


def test_rays_validation_catches_mistakes(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = dict(raw, available_node_types={**raw["available_node_types"], "gpu_worker": {
        **raw["available_node_types"]["gpu_worker"], "min_workers": "two"}})
    with pytest.raises(Exception, match="two"):
        validate_config(prepare_config(bad))


def test_cpu_head_gpu_workers(raw):
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # no training on the head
    workers = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # AWS GPU families
    assert sum(t.get("min_workers", 0) for t in workers) >= 2


def test_setup_installs_the_pinned_stacks_from_the_repo(raw):
    assert any("scripts/setup_env.sh gpu" in c for c in raw["worker_setup_commands"])
    assert any("scripts/setup_env.sh cpu" in c for c in raw["head_setup_commands"])
    text = yaml.safe_dump(raw)
    assert "==" not in text, "pin versions in requirements/*.txt, not in cluster.yaml"
    cpu, gpu = _pins("cpu.txt"), _pins("gpu.txt")
    shared = set(cpu) & set(gpu)
    assert {"torch", "ray", "pyarrow", "wandb", "torchmetrics"} <= shared
    assert {k: cpu[k] for k in shared} == {k: gpu[k] for k in shared}  # head (CPU) and workers (GPU) agree
    assert gpu["fbgemm-gpu"] == cpu["fbgemm-gpu-cpu"]
