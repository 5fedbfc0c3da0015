"""Prometheus metrics of the HTTP serving path (exported by Ray's metrics agent).

Get them through :func:`http_metrics`, one instance per process, first called inside a replica
(``ray.serve.metrics`` then adds deployment/replica/application tags): from a deployment's
constructor or from middleware, never at import.
Route tags are limited to the API's own paths (anything else is ``"other"``) so a scan of random
URLs cannot blow up the number of time series.
"""

from __future__ import annotations

import functools

from ray.serve.metrics import Counter, Histogram

KNOWN_ROUTES = frozenset({"/recommend", "/feedback", "/healthz", "/readyz", "/docs", "/openapi.json"})
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


def route_tag(path: str) -> str:
    return path if path in KNOWN_ROUTES else "other"


class HttpMetrics:
    """Request count by route and status, latency by route, popularity fallbacks."""

    def __init__(self) -> None:
        self.requests = Counter(
            "rayrec_http_requests",
            description="HTTP requests answered, by route and status code.",
            tag_keys=("route", "status"),
        )
        self.latency_ms = Histogram(
            "rayrec_http_request_latency_ms",
            description="Time from request to response in the ingress replica (ms).",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("route",),
        )
        self.fallbacks = Counter(
            "rayrec_fallbacks",
            description="Recommendations served by a fallback instead of the model, by kind.",
            tag_keys=("kind",),
        )

    def observe_request(self, path: str, status: int, latency_ms: float) -> None:
        route = route_tag(path)
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency_ms.observe(latency_ms, tags={"route": route})

    def observe_fallback(self, kind: str) -> None:
        self.fallbacks.inc(tags={"kind": kind})


@functools.cache
def http_metrics() -> HttpMetrics:
    """The process's metrics, shared by the middleware (requests) and the Ingress (fallbacks)."""
    return HttpMetrics()
