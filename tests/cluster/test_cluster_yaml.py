"""cluster/cluster.yaml is a valid cluster-launcher config by Ray's own schema and rules."""

from __future__ import annotations

import copy
import re
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
    assert any(command.startswith("cd ~/rayrec && make install") for command in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in " ".join(config[key]) for key in ("head_start_ray_commands", "worker_start_ray_commands"))


def test_a_typo_fails_rays_validation(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["ray.worker.gpu"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(broken))


def node_setup_commands(config: dict, node_type: str) -> list[str]:
    """The shell commands `ray up` / the autoscaler run on a node of this type, in order."""
    node = config["available_node_types"][node_type]
    commands = list(node.get("initialization_commands", config.get("initialization_commands", [])))
    commands += config.get("setup_commands", [])
    if node_type == config["head_node_type"]:
        commands += config.get("head_setup_commands", [])
    else:
        commands += node.get("worker_setup_commands", config.get("worker_setup_commands", []))
    return commands


def _apt_installs(command: str) -> set[str]:
    return {
        word
        for part in command.split("&&")
        if re.search(r"\bapt(-get)? install\b", part)
        for word in part.split()[part.split().index("install") + 1:]
        if not word.startswith("-")
    }


def test_every_node_type_builds_its_venv_with_one_python_and_installs_gxx_first(config):
    # Ray refuses a node whose Python minor version differs from the head's, and `make install`
    # compiles the MPZCH kernel with g++: every node type must get the same explicit pythonX.Y
    # (so an image without it fails setup instead of joining with another Python) and g++.
    pythons = {}
    for node_type in config["available_node_types"]:
        commands = node_setup_commands(config, node_type)
        make = [i for i, command in enumerate(commands) if "make install" in command]
        assert len(make) == 1, f"{node_type}: expected one `make install`, got {commands}"
        python = re.search(r"make install\b.*\bPYTHON=(python3\.\d+)\b", commands[make[0]])
        assert python, f"{node_type}: `make install` must name PYTHON=python3.X ({commands[make[0]]!r})"
        pythons[node_type] = python.group(1)
        installed_before = set().union(*(_apt_installs(command) for command in commands[: make[0]]))
        for package in ("g++", "make", python.group(1), f"{python.group(1)}-venv"):
            assert package in installed_before, f"{node_type}: {package} is not installed before `make install`"
    assert len(set(pythons.values())) == 1, f"node types run different Pythons: {pythons}"

