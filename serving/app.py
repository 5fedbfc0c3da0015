"""Build and run the serving application: the one seam where serving config enters.

Graph (bound once, in :func:`build_app`)::

    HTTP → Ingress (FastAPI: validation, titles) ──handle──► Retriever (@serve.batch exact search)

Three ways in, all through :func:`build_app`:
    - Python:        ``serve_app("runs/<id>", port=8000)`` → ``"http://127.0.0.1:8000"``
    - CLI:           ``rayrec serve --run runs/<id>``
    - Serve config:  ``serve deploy serving/serve_config.yaml`` (import path
      ``serving.app:app_builder``, which Serve calls with the YAML's ``args``)

Overload policy: each deployment caps in-flight requests per replica (``max_ongoing_requests``)
and its waiting queue (``max_queued_requests``); past that Serve answers 503 at once instead of
queueing without bound. Autoscaling moves each deployment between 1 and 2 replicas on
``target_ongoing_requests``.

No ``from __future__ import annotations`` here: Serve reads ``app_builder``'s annotation as a
class to validate the YAML args into ``ServingArgs``.
"""

import logging
import signal
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from serving.ingress import Ingress
from serving.middleware import DEFAULT_MAX_BODY_BYTES
from serving.retriever import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE, Retriever
from serving.run_index import index_dir, read_meta, resolve_dataset_dir

logger = logging.getLogger(__name__)

APP_NAME = "rayrec"


class ServingSettings(BaseModel):
    """Serving knobs; defaults suit a 2-core machine.

    Args:
        max_batch_size: requests per batched search (live: ``user_config``).
        batch_wait_timeout_s: how long a batch waits to fill (live: ``user_config``).
        max_body_bytes: request bodies above this get 413.
        max_ongoing_requests: in-flight requests per replica before queueing.
        max_queued_requests: queued requests per deployment before 503.
        min_replicas / max_replicas: autoscaling bounds, per deployment.
        target_ongoing_requests: autoscaling target per replica.
        retriever_num_cpus / ingress_num_cpus: CPUs reserved per replica.
        torch_threads: torch intra-op threads per Retriever replica.
    """

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=DEFAULT_MAX_BATCH_SIZE, ge=1)
    batch_wait_timeout_s: float = Field(default=DEFAULT_BATCH_WAIT_TIMEOUT_S, ge=0)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=1)
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)
    retriever_num_cpus: float = Field(default=0.5, ge=0)
    ingress_num_cpus: float = Field(default=0.25, ge=0)
    torch_threads: int = Field(default=1, ge=1)


class ServingArgs(ServingSettings):
    """``args`` of the Serve config: the run folder plus any ``ServingSettings`` field."""

    run_dir: str


def build_app(run_dir: str | Path, settings: ServingSettings | None = None) -> Application:
    """The bound Serve application for a run folder (nothing starts until ``serve.run``).

    Paths are resolved here, on the driver, so replicas (whose working directory differs)
    get absolute ones; a missing or malformed index fails here, before anything deploys.
    """
    settings = settings or ServingSettings()
    index_path = index_dir(run_dir)
    meta = read_meta(index_path)
    autoscaling = {
        "min_replicas": settings.min_replicas,
        "max_replicas": settings.max_replicas,
        "target_ongoing_requests": settings.target_ongoing_requests,
    }
    retriever = Retriever.options(
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": settings.retriever_num_cpus},
        user_config={
            "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_timeout_s,
        },
    ).bind(str(index_path), torch_threads=settings.torch_threads)
    return Ingress.options(
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(
        retriever,
        dataset_dir=str(resolve_dataset_dir(meta, index_path)),
        model_version=meta.version,
        max_body_bytes=settings.max_body_bytes,
    )


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
    serve.start(http_options={"host": host, "port": port})
    actual = _http_port()
    if actual != port:
        raise RuntimeError(
            f"Serve is already running on port {actual} in this Ray cluster; "
            f"use that port or call serve.shutdown() first"
        )
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if blocking:
        logger.info("serving %s at %s; Ctrl-C to stop", run_dir, url)
        block_until_interrupted()
    return url


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
