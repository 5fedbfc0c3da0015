"""Every way rayrec starts Ray sets Serve's runtime (``serving.serve_env.SERVE_ENV``).

Ray reads the HAProxy / throughput settings when ``ray start`` (or ``ray.init``) starts the
node's processes; a node started without them serves the same app through Serve's slower Python
proxy, silently. So each start path is checked against the one source of truth.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from cluster.local import HeadConfig, _head_environment
from cluster.manifests import kustomize_build, load_documents
from serving.serve_env import SERVE_ENV, apply_serve_env, haproxy_threads

REPO = Path(__file__).resolve().parents[2]


def test_apply_serve_env_keeps_an_operators_own_values():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    in_force = apply_serve_env(environ, stats_port=9000)
    assert in_force["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # the operator's explicit choice wins
    assert in_force["RAY_SERVE_HAPROXY_STATS_PORT"] == "9000"
    assert {k: environ[k] for k in SERVE_ENV if k != "RAY_SERVE_ENABLE_HA_PROXY"} == {
        k: v for k, v in SERVE_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"
    }


def test_haproxy_runs_half_the_cores_one_to_four_unless_the_operator_says():
    assert [haproxy_threads(n) for n in (1, 2, 4, 8, 16, 64)] == [1, 1, 2, 4, 4, 4]
    assert apply_serve_env({})["RAY_SERVE_HAPROXY_NBTHREAD"] == str(haproxy_threads())
    assert apply_serve_env({"RAY_SERVE_HAPROXY_NBTHREAD": "8"})["RAY_SERVE_HAPROXY_NBTHREAD"] == "8"


def test_rayrec_cluster_start_sets_the_serve_env(monkeypatch):
    for key in SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    env = _head_environment(HeadConfig())
    assert {k: env[k] for k in SERVE_ENV} == SERVE_ENV


def test_cluster_launcher_starts_every_node_with_the_serve_env():
    config = yaml.safe_load((REPO / "cluster" / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(command for command in config[key] if " ray start " in f" {command} " or "/ray start" in command)
        assigned = dict(word.split("=", 1) for word in shlex.split(start) if "=" in word and not word.startswith("-"))
        assert {k: assigned.get(k) for k in SERVE_ENV} == SERVE_ENV, key


@pytest.mark.parametrize("overlay", ["gpu", "local-cpu"])
def test_every_rayservice_pod_runs_with_the_serve_env(overlay):
    docs = load_documents(kustomize_build(overlay))
    service = next(doc for doc in docs if doc["kind"] == "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert {k: env.get(k) for k in SERVE_ENV} == SERVE_ENV, container["name"]
