"""Build and run the serving application: the one seam where serving config enters.

Graph (bound once, in :func:`build_app`)::

    HTTP (HAProxy) → Ingress (FastAPI; per batch of requests, in process: retrieve C candidates
                │             → one FMCache.get → rank → top k; value model live via user_config)
                ├──► FeedbackSink (WAL → Parquet) ──► Predictor ──► FMWorker pool ──► FMCache
                │         └──► HistoryBoard (clicks, engagements) ◄── long poll ── every Ingress
                └──► HistoryBoard.publish_items (POST/DELETE /items → catalogue log) ──┘

In ``fm_mode`` reactive (the cache baseline, ``serving.reactive``) the Ingress hands its cache
misses straight to the FMWorker pool and the Predictor is told nothing.

The request path is one deployment, the Ingress, 2 replicas by default, each answering a request whole (``serving.ingress`` says why; ``serving.serve_env`` why HAProxy):
the only call it makes is the ranking stage's one FM cache read per batch. The ranking stage
loads in the Ingress only when the run provides a ranker (``runs/<id>/ranker/``, or a custom
``models_factory``); the precompute half (FMCache, Predictor, FMWorker) only when the ranker has
a foundation model's worth of work to take off the path (``precompute_enabled``). A
retrieval-only run gets Ingress and FeedbackSink.

Three ways in, all through :func:`build_app`:
    - Python:        ``serve_app("runs/<id>", port=8000)`` → ``"http://127.0.0.1:8000"``
    - CLI:           ``rayrec serve --run runs/<id>``
    - Serve config:  ``serve deploy serving/serve_config.yaml`` (import path
      ``serving.app:app_builder``, which Serve calls with the YAML's ``args``)

Overload policy: each deployment caps in-flight requests per replica (``max_ongoing_requests``)
and its waiting queue (``max_queued_requests``); past that Serve answers ``shed_status`` (429)
with ``Retry-After`` at once instead of queueing without bound. The defaults bound the Ingress's
queue to about a batch in flight and one waiting (16 + 16 per replica, ~0.25 s of work at
~120-150 req/s on 2 cores): past saturation a deeper queue only turns into latency, and on these
cores into a client and a server fighting for the CPU. At 1.5x saturation, 16 + 16 answered
121-155 2xx/s where 32 + 64 answered 62-82 (2 interleaved rounds, load average 5-20); before,
64 + 256 was ~16 s of queue at 20 req/s, past the 10 s timeout. Serve answers 408 past ``request_timeout_s``. Replicas drain in-flight requests for up to
``graceful_shutdown_timeout_s`` before they stop (the FeedbackSink compacts its log then).
The drain checks for zero in-flight requests every ``graceful_shutdown_wait_loop_s`` (Serve's
default is 2 s): Ray 2.60's routers keep sending a stopping replica new requests until it has
stopped, so under steady load a slow check can miss every idle instant, run into the timeout
and be force-killed with a request in flight (the client's retry hides it; a short check
avoids it).
Autoscaling moves the Ingress between min and max replicas on ``target_ongoing_requests``. The stateful deployments do not autoscale: FeedbackSink runs
``feedback_replicas`` (its log takes several writers), FMCache and Predictor exactly one each
(they hold the app's one copy of the precomputed rows and of the traffic model; why two would be
wrong: ``serving.fm_cache.FMCache`` and ``serving.precompute.Predictor``).

No ``from __future__ import annotations`` here: Serve reads ``app_builder``'s annotation as a
class to validate the YAML args into ``ServingArgs``.
"""

import logging
import signal
import time
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig

from training.data.catalogue_log import CATALOGUE_DIR, CATALOGUE_FILE
from serving.feedback import FeedbackSink
from serving.history_board import HistoryBoard
from serving.live_history import DEFAULT_HISTORY_LEN
from serving.fm_cache import FMCache
from serving.ingress import Ingress
from serving.middleware import DEFAULT_MAX_BODY_BYTES
from serving.precompute import FMWorker, PrecomputeSettings, Predictor
from serving.ranker import RankerLiveConfig
from serving.ranking_models import DEFAULT_MODELS_FACTORY, run_has_ranker
from serving.retriever import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE
from serving.run_index import check_ttt, index_dir, index_location, read_meta, resolve_dataset_dir, resolve_index
from serving.serve_env import apply_serve_env
from training.runs import RunDir
from training.storage import storage_env

logger = logging.getLogger(__name__)

APP_NAME = "rayrec"


class ServingSettings(BaseModel):
    """Serving knobs; defaults suit a 2-core machine.

    Args:
        max_batch_size: requests retrieved and ranked together (live: ``user_config``).
        batch_wait_timeout_s: how long an idle Ingress waits for a batch to fill (live; 0: a batch
            is whatever queued while the previous one ran, ``serving.batching``).
        max_body_bytes: request bodies above this get 413.
        max_ongoing_requests: in-flight requests per replica before queueing.
        max_queued_requests: requests waiting for a slot before the shed status (per replica on
            the Ingress, which HAProxy reaches directly; per caller elsewhere).
        min_replicas / max_replicas: autoscaling bounds of the Ingress. Two by default, one per
            core of the 2-core machine it is benchmarked on: HTTP parsing and the shed answers
            are Python, one core per process, so past saturation one replica spent its core
            answering the shed requests (goodput 0.48 of saturation at 3x); at 950 req/s offered,
            FM off, 2 replicas answered 824-868 2xx/s against 472-679 for one
            (``benchmarks/ingress_replicas_ab.py``, docs/architecture.md). Both bounds are 2 so
            that capacity is there before a burst, not 5 s of upscale delay into it; raise them
            with the cores, about one replica per core.
        target_ongoing_requests: autoscaling target per replica.
        upscale_delay_s / downscale_delay_s: autoscaler reaction delays (None: Serve's 30 s / 600 s).
        look_back_period_s: the window the autoscaler averages ongoing requests over (None:
            Serve's 30 s; shorter follows a step in load sooner, longer ignores bursts).
        ingress_num_cpus / fm_worker_num_cpus: CPUs reserved per replica (the Ingress retrieves
            and ranks).
        replica_resources: custom Ray resources every replica also asks for, to keep serving on
            the nodes that advertise them (e.g. ``{serving: 0.01}`` on a serving node group).
        torch_threads: torch intra-op threads per Ingress / FMWorker replica.
        retriever_index: the retrieval's search backend: "auto" (the run's learned index, MFLI or
            HSNN, else exact), or "exact" / "mfli" / "hsnn" by name.
        retriever_beam: beam width of a learned index (None: the width saved with the index);
            wider finds more of the exact top-k and scores more items.
        retriever_ttt: HSNN runs: test-time training per request (a copy of the scorer
            fine-tuned on the training examples under the nodes the beam keeps); ~150 ms of CPU
            per user on ml-100k, so off unless its measured gain is worth it
            (docs/benchmarks/hsnn_ttt.md). Any other index refuses it at deploy.
        shed_status / retry_after_s: the answer to a request shed by a full queue.
        request_timeout_s: the proxy answers 408 past this (end to end).
        graceful_shutdown_timeout_s: how long a stopping replica drains in-flight requests.
        graceful_shutdown_wait_loop_s: how often a draining replica checks it is idle.
        feedback_dir: where /feedback events go (None: ``data/feedback`` under the working
            directory of the process that builds the app).
        feedback_compact_every_s: seconds between WAL → Parquet compactions.
        feedback_archive: a URI (``s3://bucket/feedback``) or shared folder where compacted
            feedback parts are published for training on other nodes (None: only ``feedback_dir``).
        feedback_replicas: FeedbackSink replicas (fixed, not autoscaled). They share one log
            folder safely (``serving.feedback_log``: own segments per writer, dedupe across
            writers at compaction); 2 keep /feedback acknowledging while one replica restarts.
        ranker: "auto" (a ranker when the run has one or ``models_factory`` is not the
            default), "off" (retrieval only).
        models_factory: ``"module:function"`` loading the run's ranker and FM.
        ranker_run: the run folder whose ``ranker/`` to serve, when the ranker was trained in a
            run of its own (``rayrec train --config configs/ml100k-ranker.yaml``); None: ``run_dir``.
        num_candidates: items retrieved and ranked per request, whatever k; with a ranker, also
            the largest k a request may ask for (422 above it).
        ranker_live: the ranking stage's live config (value model, fm_mode; the ``ranker`` entry
            of the Ingress's ``user_config``).
        live_history: update each user's history from acknowledged clicks and engagements
            (``serving.history_board``; False: histories frozen at export).
        live_history_len: live items kept per user (the training configs' ``data.history_len``).
            ``live_history`` also carries live item changes (``POST /items``, ``DELETE
            /items/{id}``; ``serving.live_items``): off, they are refused with a 409.
        catalogue_dir: where the board's catalogue log of live item changes is kept
            (``training.data.catalogue_log``; None: ``<feedback_dir>/catalogue``).
        items_apply_timeout_s: the longest ``POST /items`` waits for every Ingress replica to
            apply the items before answering (the answer says how many did).
        precompute_enabled: run the speculative precompute (Predictor, FMWorker pool, FMCache);
            the ``reactive`` fm_mode needs it too (it fills the same cache with the same workers).
        precompute: its knobs.
        deploy_timeout_s: how long :func:`deploy_declaratively` waits for RUNNING.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_TIMEOUT_S, ge=0)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=16, ge=1)
    min_replicas: int = Field(default=2, ge=1)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)
    upscale_delay_s: float | None = Field(default=5.0, ge=0)
    downscale_delay_s: float | None = Field(default=30.0, ge=0)
    look_back_period_s: float | None = Field(default=15.0, gt=0)
    ingress_num_cpus: float = Field(default=0.5, ge=0)
    replica_resources: dict[str, float] = Field(default_factory=dict)
    torch_threads: int = Field(default=1, ge=1)
    retriever_index: Literal["auto", "exact", "mfli", "hsnn"] = "auto"
    retriever_beam: int | None = Field(default=None, ge=1)
    retriever_ttt: bool = False
    fm_worker_num_cpus: float = Field(default=0.25, ge=0)
    shed_status: Literal[429, 503] = 429
    retry_after_s: float = Field(default=1.0, ge=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=10.0, ge=0)
    graceful_shutdown_wait_loop_s: float = Field(default=0.1, gt=0)
    feedback_dir: str | None = None
    feedback_compact_every_s: float = Field(default=30.0, gt=0)
    feedback_archive: str | None = None
    feedback_replicas: int = Field(default=1, ge=1)
    ranker: Literal["auto", "off"] = "auto"
    models_factory: str = DEFAULT_MODELS_FACTORY
    ranker_run: str | None = None
    num_candidates: int = Field(default=50, ge=1, le=1000)
    ranker_live: RankerLiveConfig = Field(default_factory=RankerLiveConfig)
    live_history: bool = True
    live_history_len: int = Field(default=DEFAULT_HISTORY_LEN, ge=1)
    catalogue_dir: str | None = None
    items_apply_timeout_s: float = Field(default=10.0, gt=0)
    precompute_enabled: bool = True
    precompute: PrecomputeSettings = Field(default_factory=PrecomputeSettings)
    deploy_timeout_s: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _replica_bounds(self) -> "ServingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas}): "
                             "set both (the default is 2 and 2)")  # fmt: skip
        return self


class ServingArgs(ServingSettings):
    """``args`` of the Serve config: the run folder plus any ``ServingSettings`` field."""

    run_dir: str


def build_app(run_dir: str | Path, settings: ServingSettings | None = None) -> Application:
    """The bound Serve application for a run folder (nothing starts until ``serve.run``).

    Paths are resolved here, on the driver, so replicas (whose working directory differs)
    get absolute ones; a missing or malformed index fails here, before anything deploys.
    """
    settings = settings or ServingSettings()
    run_path = RunDir.open(run_dir).location  # an absolute path or a URI: what replicas open
    index_path = index_dir(run_path)
    meta = read_meta(index_path)
    name, _ = resolve_index(index_path, meta, settings.retriever_index)  # a wrong choice fails here, not in a replica
    check_ttt(index_path, name, settings.retriever_ttt)
    common = _options(settings)
    scaled = {
        **common,
        "autoscaling_config": {
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            **{
                name: getattr(settings, name)
                for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")
                if getattr(settings, name) is not None
            },
        },
    }
    ranking = has_ranker_stage(run_path, settings)
    predictor, cache, workers = None, None, None
    if ranking and settings.precompute_enabled:
        cache, predictor, workers = _precompute(run_path, settings)
    feedback_dir = Path(settings.feedback_dir or Path.cwd() / "data" / "feedback").resolve()
    board = None
    if settings.live_history:  # one replica, never autoscaled (serving.history_board says why)
        board = HistoryBoard.options(
            max_queued_requests=settings.max_queued_requests, num_replicas=1,
            graceful_shutdown_wait_loop_s=settings.graceful_shutdown_wait_loop_s,
            ray_actor_options=_actor_options(0, settings),
        ).bind(str(feedback_dir), history_len=settings.live_history_len,
               catalogue_path=str(catalogue_dir(settings, feedback_dir) / CATALOGUE_FILE))
    feedback = FeedbackSink.options(**common, num_replicas=settings.feedback_replicas, ray_actor_options=_actor_options(0, settings)).bind(
        str(feedback_dir), predictor, compact_every_s=settings.feedback_compact_every_s,
        archive=settings.feedback_archive, history_board=board,
    )
    return Ingress.options(
        **scaled, ray_actor_options=_actor_options(settings.ingress_num_cpus, settings), user_config=live_config(settings, ranking)
    ).bind(
        index_location(run_path),
        dataset_dir=resolve_dataset_dir(meta, index_path),
        model_version=meta.version,
        index=settings.retriever_index,
        beam=settings.retriever_beam,
        ttt=settings.retriever_ttt,
        models_run=models_run(run_path, settings) if ranking else None,
        models_factory=settings.models_factory if ranking else None,
        fm_cache=cache,
        predictor=predictor,
        feedback=feedback,
        num_candidates=settings.num_candidates,
        max_body_bytes=settings.max_body_bytes,
        torch_threads=settings.torch_threads,
        react_to_misses=settings.precompute.react_to_misses,
        history_board=board,
        history_len=settings.live_history_len,
        fm_workers=workers,
        apply_timeout_s=settings.items_apply_timeout_s,
    )


def catalogue_dir(settings: ServingSettings, feedback_dir: Path) -> Path:
    """The folder of the catalogue log: ``catalogue_dir``, else ``<feedback_dir>/catalogue``
    (inside the feedback folder, so an app's live items go wherever its feedback goes)."""
    return Path(settings.catalogue_dir).resolve() if settings.catalogue_dir else feedback_dir / CATALOGUE_DIR


def live_config(settings: ServingSettings, ranking: bool) -> dict[str, Any]:
    """The Ingress's ``user_config``: batching, and the ranking stage's live config with a ranker."""
    config: dict[str, Any] = {"max_batch_size": settings.max_batch_size, "batch_wait_timeout_s": settings.batch_wait_timeout_s}
    if ranking:
        config["ranker"] = settings.ranker_live.model_dump(mode="json")
    return config


def has_ranker_stage(run_dir: str | Path, settings: ServingSettings) -> bool:
    """Whether :func:`build_app` binds the ranker half for this run and these settings."""
    return settings.ranker == "auto" and (
        settings.models_factory != DEFAULT_MODELS_FACTORY or run_has_ranker(models_run(run_dir, settings))
    )


def models_run(run_dir: str | Path, settings: ServingSettings) -> str:
    """The run handed to the models factory (absolute path or URI): ``ranker_run`` if set, else the run."""
    return RunDir.open(settings.ranker_run or run_dir).location


def _actor_options(num_cpus: float, settings: ServingSettings) -> dict[str, Any]:
    """A replica's actor options: its CPUs, the configured custom resources, and the
    object-storage credentials of this driver (``training.storage.storage_env``) so a replica
    on any node reads a run kept in a bucket."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if settings.replica_resources:
        options["resources"] = dict(settings.replica_resources)
    env = storage_env()
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def _options(settings: ServingSettings) -> dict[str, Any]:
    """Options every deployment shares: bounded queues, shedding with Retry-After, draining."""
    return {
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": BackpressureConfig(
            status_code=settings.shed_status, retry_after_s=settings.retry_after_s
        ),
        "graceful_shutdown_timeout_s": settings.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": settings.graceful_shutdown_wait_loop_s,
    }


def _precompute(run_path: Path, settings: ServingSettings) -> tuple[Any, Any, Any]:
    """Bind the FMCache, the Predictor (SOLARIS) and the FMWorker pool they share with the
    ``reactive`` FM mode (``serving.reactive``); returns (cache, predictor, workers)."""
    pre = settings.precompute
    # Bounded queues here too: under overload the fire-and-forget traffic signals are shed, and
    # a cache read that would queue fails fast so the ranking stage falls back to the missing-FM path.
    bounded = {
        "max_queued_requests": settings.max_queued_requests,
        "graceful_shutdown_wait_loop_s": settings.graceful_shutdown_wait_loop_s,
    }
    # FMCache and Predictor: one replica each, never autoscaled (their class docstrings say why)
    cache = FMCache.options(**bounded, num_replicas=1, ray_actor_options=_actor_options(0, settings)).bind(
        pre.cache_capacity, pre.cache_ttl_s
    )
    workers = FMWorker.options(
        graceful_shutdown_wait_loop_s=settings.graceful_shutdown_wait_loop_s,
        num_replicas=pre.workers, ray_actor_options=_actor_options(settings.fm_worker_num_cpus, settings)
    ).bind(models_run(run_path, settings), settings.models_factory, cache, torch_threads=settings.torch_threads,
           nice=pre.worker_nice, idle=pre.worker_idle_class)
    # The Predictor asks the Ingress (by name: it is bound after the Predictor) for the candidates
    # of users it saw only through /feedback.
    predictor = Predictor.options(**bounded, num_replicas=1, ray_actor_options=_actor_options(0, settings)).bind(
        "Ingress", cache, workers, pre.model_dump()
    )
    return cache, predictor, workers


def app_builder(args: ServingArgs) -> Application:
    """Entry for ``import_path: serving.app:app_builder``; Serve passes the YAML ``args``."""
    if not isinstance(args, ServingArgs):  # called directly with a dict
        args = ServingArgs.model_validate(args)
    settings = ServingSettings.model_validate(args.model_dump(exclude={"run_dir"}))
    return build_app(args.run_dir, settings)


def serve_app(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = False,
    settings: ServingSettings | None = None,
) -> str:
    """Deploy the app for ``run_dir`` and return its base URL, e.g. ``"http://127.0.0.1:8000"``.

    Starts Serve (and a local Ray, unless one is initialised or ``RAY_ADDRESS`` names one)
    listening on ``host:port``; loopback by default so nothing is exposed by accident. Returns
    once the app is RUNNING; with ``blocking=True`` it then waits until Ctrl-C and shuts the
    app down.
    """
    app = build_app(run_dir, settings)  # fail on a bad run folder before starting anything
    settings = settings or ServingSettings()
    if not ray.is_initialized():
        apply_serve_env()  # the local Ray that serve.start brings up serves through HAProxy
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s})
    actual = _http_port()
    if actual != port:
        raise RuntimeError(
            f"Serve is already running on port {actual} in this Ray cluster; "
            f"use that port or call serve.shutdown() first"
        )
    serve.run(app, name=APP_NAME, route_prefix="/")
    if has_ranker_stage(run_dir, settings):
        raise_if_ranker_rejected()
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if blocking:
        logger.info("serving %s at %s; Ctrl-C to stop", run_dir, url)
        block_until_interrupted()
    return url


def deploy_declaratively(
    run_dir: str | Path, settings: ServingSettings | None = None, host: str = "127.0.0.1", port: int = 8000
) -> str:
    """Deploy, or update in place, the app the way ``serve deploy serving/serve_config.yaml`` and
    a RayService do: as a declarative config (``import_path`` + ``args`` + per-deployment
    overrides). Returns the base URL once the app is RUNNING.

    Why a second way in: Serve gives every ``serve.run`` of a Python app a fresh code version,
    so each one restarts every replica. A config whose ``args`` are unchanged keeps its code
    version, and a changed ``user_config`` (the Ingress's: batching and ``settings.ranker_live``,
    value model and fm_mode) reaches the live replicas through ``reconfigure()``: no restart,
    no dropped request. A ``ranker_live`` the ranking stage cannot serve is rejected by the replicas,
    which keep the config in force, and raises ValueError here (:func:`raise_if_ranker_rejected`).
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    settings = settings or ServingSettings()
    build_app(run_dir, settings)  # fail on a bad run folder or settings here, not in the controller
    if not ray.is_initialized():
        apply_serve_env()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s})
    if _http_port() != port:
        raise RuntimeError(f"Serve is already running on port {_http_port()} in this Ray cluster")
    run_path = RunDir.open(run_dir).location
    overrides = [{"name": "Ingress", "user_config": live_config(settings, has_ranker_stage(run_path, settings))}]
    args = {"run_dir": run_path, **settings.model_dump(mode="json", exclude={"ranker_live"})}
    args["feedback_dir"] = str(Path(settings.feedback_dir or Path.cwd() / "data" / "feedback").resolve())
    if settings.catalogue_dir:
        args["catalogue_dir"] = str(Path(settings.catalogue_dir).resolve())
    if settings.ranker_run:
        args["ranker_run"] = models_run(run_path, settings)
    config = ServeDeploySchema.model_validate(
        {"applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "serving.app:app_builder",
                           "args": args, "deployments": overrides}]}
    )
    before = serve.status().applications.get(APP_NAME)
    _get_global_client().deploy_apps(config)  # what `serve deploy` asks the controller
    _wait_until_running(before.last_deployed_time_s if before else None, timeout_s=settings.deploy_timeout_s)
    if has_ranker_stage(run_path, settings):
        raise_if_ranker_rejected()
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def raise_if_ranker_rejected() -> None:
    """ValueError when the running ranking stage rejected the ``ranker_live`` it was sent.

    The stage keeps serving its current config when a new one cannot work for its models (a
    value term on a signal it does not predict; ``serving.ranker.RankingService.reconfigure``), so the
    app stays RUNNING; this turns that into an error for whoever deployed the config. Every
    replica loads the same models and gets the same config, so one replica's answer holds.
    """
    info = serve.get_deployment_handle("Ingress", APP_NAME).info.remote().result()
    if info.get("rejected_config"):
        raise ValueError(
            f"the ranking stage rejected ranker_live ({info['rejected_config']}); it keeps serving "
            f"fm_mode={info['fm_mode']!r}, value={info['value']}"
        )


def _wait_until_running(previous_deploy_time: float | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.last_deployed_time_s != previous_deploy_time:
            if app.status == "RUNNING":
                return
            if app.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploying {APP_NAME} failed: {app.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{APP_NAME} not RUNNING after {timeout_s}s")


def block_until_interrupted() -> None:
    """Keep this driver (and a local Ray it started) alive until Ctrl-C or SIGTERM, then remove
    the app. SIGTERM counts too: it is how ``kill``, process managers and Kubernetes stop us."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _http_port() -> int:
    # Serve keeps the first HTTP options a cluster started with and only warns on a mismatch;
    # its client is the one place that says which port is really bound.
    from ray.serve.context import _get_global_client

    config: Any = _get_global_client().http_config
    return int(config.port)
