"""ASGI middleware that hardens the HTTP API: body size limit, no 500s, request metrics.

Pure ASGI classes (not ``BaseHTTPMiddleware``) so they see every byte and every status,
including responses written by the other middleware. Stack, outermost first::

    RequestMetrics → ErrorsAs503 → BodySizeLimit → FastAPI routes

- ``BodySizeLimit`` answers 413 for bodies over the limit, whether declared by Content-Length
  or streamed chunked, before FastAPI parses anything. The limit is read from
  ``app.state.max_body_bytes`` (set by the Ingress constructor, the one place config enters).
- ``ErrorsAs503`` turns any exception that escapes a route into a logged 503 with a short
  message, so a bug or a dead retriever never leaks a traceback or reads as a 500. Input
  errors never reach it: FastAPI answers those with 4xx first.
- ``RequestMetrics`` counts every response by route and status and times it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import http_metrics

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_BYTES = 64 * 1024


class BodySizeLimit:
    """413 for request bodies larger than ``app.state.max_body_bytes`` (default 64 KiB).

    The body is read in full (at most limit + one message) and replayed to the app, so the
    app never starts on a request it will have to abandon half way.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _max_body_bytes(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _error(scope, receive, send, 400, "Content-Length must be a non-negative integer")
                return
            if int(declared) > limit:
                await _error(scope, receive, send, 413, f"request body over the {limit}-byte limit")
                return
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":  # client went away: let the app see it
                break
            size += len(message.get("body", b""))
            if size > limit:
                await _error(scope, receive, send, 413, f"request body over the {limit}-byte limit")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


class ErrorsAs503:
    """Any exception escaping the app → logged, answered 503 ``{"detail": ...}`` with
    ``Retry-After: 1`` (every rayrec route is idempotent, so a retry is safe)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("unhandled error serving %s %s", scope.get("method"), scope.get("path"))
            if not started:  # once headers are out, the status can no longer change
                await _error(scope, receive, send, 503, "internal error while serving; retry later",
                             headers={"Retry-After": "1"})


class RequestMetrics:
    """Request count by (route, status) and latency by route, for every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics = http_metrics()  # built with the stack: first request, in the replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 503  # if nothing is ever sent, the client sees a failure

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe_request(
                scope.get("path", ""), status, (time.perf_counter() - start) * 1e3
            )


def _max_body_bytes(scope: Scope) -> int:
    app: Any = scope.get("app")
    state = getattr(app, "state", None)
    return int(getattr(state, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))


async def _error(
    scope: Scope, receive: Receive, send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    await JSONResponse({"detail": detail}, status_code=status, headers=headers)(scope, receive, send)
