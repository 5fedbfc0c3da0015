"""cluster/cluster.yaml is a valid cluster-launcher config by Ray's own schema and rules."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster" / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_validation(config):
    # prepare_config fills the provider defaults the way `ray up` does, then Ray's validator
    # checks the result against ray/autoscaler/ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cpu_and_gpu_worker_types_and_make_install(config):
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["ray.worker.cpu"]["resources"].get("GPU", 0) == 0
    assert types["ray.worker.gpu"]["resources"]["GPU"] == 1
    assert "cd ~/rayrec && make install" in config["setup_commands"]
    assert all("RAY_AUTH_MODE=token" in " ".join(config[key]) for key in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_a_typo_fails_rays_validation(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.gpu"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))
