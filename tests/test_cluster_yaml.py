"""cluster.yaml is a valid Ray cluster launcher config (Ray's own prepare + schema validation), and its nodes set up
the stack with the repo's setup script."""

import os

import yaml

from tests.conftest import REPO


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    with open(os.path.join(REPO, "cluster.yaml")) as f:
        raw = yaml.safe_load(f)
    validate_config(prepare_config(raw))  # raises on any schema error
    assert raw["head_node_type"] in raw["available_node_types"]
    assert any("scripts/setup_env.sh" in c for c in raw["setup_commands"])
    workers = [t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]]
    assert sum(t.get("min_workers", 0) for t in workers) >= 2  # a multi-node run by default
