"""Shared fixtures: one local Ray and one prepared ml-100k per test session.

Starting Ray costs 5-10 s and a 2-worker TorchTrainer run about 20 s on this class of machine,
so the session shares one Ray instance and the tiny trained runs (two-tower, MFLI, HSNN) that
several test modules read: each is trained at most once per session, on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def ml100k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ml-100k in the rayrec layout (the recbole wheel is cached in ~/.cache/rayrec)."""
    from training.data.movielens import prepare_ml100k

    out = tmp_path_factory.mktemp("data") / "ml-100k"
    cache = Path(os.environ.get("RAYREC_CACHE", Path.home() / ".cache" / "rayrec"))
    prepare_ml100k(out, cache)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray shared by the whole session (4 logical CPUs: 2 train workers + Serve)."""
    import ray

    if not ray.is_initialized():
        from serving.serve_env import apply_serve_env

        # Serve as rayrec ships it (HAProxy ingress, throughput-optimized); HAProxy's own
        # listeners on ports of the tests' range, not Ray's defaults another cluster may hold
        apply_serve_env(stats_port=8376, metrics_port=8377)
        # address="local": always a fresh Ray of this session's own, never another one running here
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_session, ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished 2-worker run of configs/tiny.yaml on ml-100k (RunDir)."""
    from training.config import load_config
    from training.jobs.train_retrieval import run

    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={ml100k_dir}", f"runs_dir={runs}"])
    return run(cfg, run_id="tiny")


@pytest.fixture(scope="session")
def tiny_mfli_run(ray_session, ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished 2-worker run of configs/tiny-mfli.yaml (RunDir), read by training and serving tests."""
    from training.config import load_config
    from training.jobs.train_mfli import run

    runs = tmp_path_factory.mktemp("mfli-runs")
    cfg = load_config(REPO / "configs" / "tiny-mfli.yaml", [f"data.path={ml100k_dir}", f"runs_dir={runs}"])
    return run(cfg, run_id="tiny-mfli")


@pytest.fixture(scope="session")
def tiny_hsnn_run(ray_session, ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished 2-worker run of configs/tiny-hsnn.yaml (RunDir), read by training and serving tests."""
    from training.config import load_config
    from training.jobs.train_hsnn import run

    runs = tmp_path_factory.mktemp("hsnn-runs")
    cfg = load_config(REPO / "configs" / "tiny-hsnn.yaml", [f"data.path={ml100k_dir}", f"runs_dir={runs}"])
    return run(cfg, run_id="tiny-hsnn")
