"""The Serve app the serving benchmarks drive: which run it serves, how it is deployed, and
how its replicas are read. Shared by ``bench_serving.py``, ``chaos.py`` and ``serving_stages.py``.

Until a trained ranker artifact exists (``runs/<id>/ranker/``) the app's ranker and FM are the
stand-ins of ``tests/serving/stand_in_models.py`` (``STAND_IN``), with an FM made ~25 MLP layers
deep so that it costs what precompute is meant to hide.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from results import versions as _versions

ROOT = Path(__file__).resolve().parents[1]
PORT = 8350  # serving's port range 8340-8359
STAND_IN = "tests.serving.stand_in_models:load_heavy_stand_in"


def newest_run(dataset: Path, config: str = "tiny.yaml", model: str = "two_tower") -> Path:
    """The newest run of ``model`` (``index.json``'s, e.g. two_tower, mfli) under runs/ on
    ``dataset`` (trains ``configs/<config>``, a config of that kind, if none)."""
    import importlib

    found = []
    for marker in (ROOT / "runs").glob("*/index/index.json"):
        meta = json.loads(marker.read_text())
        if meta.get("model") == model and Path(meta["dataset"]).name == dataset.name:
            found.append((marker.stat().st_mtime, marker.parent.parent))
    if found:
        return max(found)[1]
    from training.config import load_config
    from training.jobs import JOBS

    print(f"no {dataset.name} {model} run under runs/: training configs/{config} first", flush=True)
    cfg = load_config(ROOT / "configs" / config, [f"data.path={dataset}"])
    return importlib.import_module(JOBS[model]).run(cfg).path


def newest_ranker_run(dataset: Path) -> Path | None:
    """The newest run under runs/ with a ranker/ artifact trained on ``dataset``, if any."""
    import yaml

    found = []
    for marker in (ROOT / "runs").glob("**/ranker/ranker.json"):
        run = marker.parent.parent
        try:
            data = yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
        except (OSError, KeyError, TypeError):
            continue
        if Path(data).name == dataset.name:
            found.append((marker.stat().st_mtime, run))
    return max(found)[1] if found else None


@dataclass(frozen=True)
class AppSpec:
    """What a phase deploys: the run whose index serves, where /feedback goes, the models
    factory, and the run whose ranker/ the app serves (None: the factory's own)."""

    run_dir: Path
    feedback_dir: Path
    factory: str
    ranker_run: Path | None = None


def deploy(app: AppSpec, candidates: int, port: int = PORT, max_replicas: int | None = None, **live) -> str:
    """Deploy (or reconfigure in place) the app on ``port``; ``live`` is the ranking stage's
    ``RankerLiveConfig`` (e.g. ``fm_mode``); ``max_replicas`` overrides the shipped autoscaling
    bound (only the autoscaling phase does, to show it). Returns the app's URL."""
    from serving.app import ServingSettings, deploy_declaratively
    from serving.precompute import PrecomputeSettings
    from serving.ranker import RankerLiveConfig

    # The shipped defaults: only what this app serves, where its feedback goes and the live
    # ranker config (fm_mode) are set here; queue bounds, batching and autoscaling are not.
    settings = ServingSettings(
        feedback_dir=str(app.feedback_dir),
        models_factory=app.factory,
        ranker_run=str(app.ranker_run) if app.ranker_run else None,
        num_candidates=candidates,
        ranker_live=RankerLiveConfig(**live),
        precompute=PrecomputeSettings(candidates=candidates),
        **({"max_replicas": max_replicas} if max_replicas is not None else {}),
    )
    # Declarative (as `serve deploy`): a later call that changes only ranker_live reconfigures the
    # live Ranker replicas in place, so the FM cache and the predictor's state survive mode swaps.
    return deploy_declaratively(app.run_dir, settings, port=port)


def handle(name: str):
    from ray import serve

    from serving.app import APP_NAME

    return serve.get_deployment_handle(name, APP_NAME)


def replicas() -> dict[str, int]:
    from ray import serve

    from serving.app import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {}
    return {name: sum(n for st, n in d.replica_states.items() if st == "RUNNING") for name, d in app.deployments.items()}


def wait_steady(timeout_s: float = 90.0) -> float:
    """Seconds until the Ingress is HEALTHY at its shipped minimum replicas (none starting or
    draining), so a phase does not measure the previous phase's scale-down."""
    from ray import serve

    from serving.app import APP_NAME, ServingSettings

    steady = ServingSettings().min_replicas

    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and all(
            d.status == "HEALTHY" and set(d.replica_states) <= {"RUNNING"} and d.replica_states.get("RUNNING", 0) == steady
            for name, d in app.deployments.items() if name == "Ingress"
        ):
            return time.perf_counter() - start
        time.sleep(1.0)
    return time.perf_counter() - start


def versions() -> dict:
    return _versions({"torch": "torch", "torchrec": "torchrec", "ray": "ray", "aiohttp": "aiohttp"})
