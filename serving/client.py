"""The HTTP client rayrec ships: retries what is safe to retry, honours ``Retry-After``, never hangs.

Why a client of our own: when a replica dies mid-request, when a queue is full (429/503 with
``Retry-After``) or when the proxy times a request out (408), the right move for an idempotent
call is to wait and try again, with a bound on the total time. Every caller would otherwise
write that loop, and most would get it wrong (no jitter, ignoring ``Retry-After``, retrying a
400). Both calls here are idempotent: ``/recommend`` reads, and ``/feedback`` events carry an
``event_id`` the log deduplicates on (a retried batch is logged once), so retrying them is safe.

Retried: connection errors and resets, read timeouts, 408, 429, 500, 502, 503, 504. Not
retried: other 4xx (the request is wrong; retrying cannot fix it). 500 is retried because
rayrec's own code never answers it (``serving.middleware.ErrorsAs503``): the one 500 seen is
Serve's proxy reporting that an Ingress replica died with the request in flight (a replica
stopped mid-rollout past its graceful-shutdown timeout, or a lost node). The wait before attempt n+1 is ``Retry-After`` when
the server sent one, else ``backoff_s · 2^n`` with full jitter, capped at ``max_backoff_s``;
the whole call never takes longer than ``deadline_s``.

Example::

    with RecommendClient("http://127.0.0.1:8000") as client:
        answer = client.recommend(user_id=196, k=10)   # dict, RecommendResponse's JSON
        answer["items"][0]["item_id"]
        client.feedback([event_from(answer, position=0, event="click")])   # versions, position, candidates
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_RETRY_ERRORS = (httpx.TransportError,)  # connect/read errors, timeouts, dropped connections


class RequestFailed(RuntimeError):
    """The call did not succeed within its attempts or deadline.

    Attributes:
        status: the last HTTP status (None when the last attempt got no response).
        detail: the server's message or the transport error.
        attempts: how many attempts were made.
    """

    def __init__(self, status: int | None, detail: str, attempts: int) -> None:
        super().__init__(f"{'HTTP ' + str(status) if status else 'no response'} after {attempts} attempt(s): {detail}")
        self.status, self.detail, self.attempts = status, detail, attempts


@dataclass
class ClientStats:
    """Counters a load test or a caller can read: what the retries hid."""

    calls: int = 0
    attempts: int = 0
    retried_statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try.

    Args:
        max_attempts: attempts per call (1 = no retry).
        backoff_s / max_backoff_s: exponential backoff base and cap (full jitter).
        max_retry_after_s: a server's ``Retry-After`` is honoured up to this.
        deadline_s: the whole call, all attempts and waits, ends by then.
        attempt_timeout_s: one attempt's HTTP timeout.
    """

    max_attempts: int = 5
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    max_retry_after_s: float = 5.0
    deadline_s: float = 30.0
    attempt_timeout_s: float = 10.0


class RecommendClient:
    """A synchronous, thread-safe client of one rayrec app.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        policy: retry policy (defaults suit interactive traffic).
        seed: jitter seed (tests pass one for reproducible waits).
    """

    def __init__(self, base_url: str, policy: RetryPolicy | None = None, seed: int | None = None) -> None:
        self.policy = policy or RetryPolicy()
        self.stats = ClientStats()
        self._http = httpx.Client(base_url=base_url, timeout=self.policy.attempt_timeout_s)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # stats and the jitter RNG are shared by caller threads
        self._local = threading.local()

    def __enter__(self) -> RecommendClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def recommend(
        self, user_id: int, k: int = 10, exclude_seen: bool = True, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /recommend``; returns the response JSON (``items``, ``model_version``, ...).

        ``context``: flat request context, e.g. ``{"surface": "home"}`` (up to 16 entries of
        str / bool / int / float; ``serving.schemas.RecommendRequest.context``), passed to the
        ranker stage. A ``k`` above the app's ``num_candidates`` (when it ranks) is a 422.
        """
        body: dict[str, Any] = {"user_id": user_id, "k": k, "exclude_seen": exclude_seen}
        if context is not None:
            body["context"] = context
        return self._call("POST", "/recommend", body)

    def feedback(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """``POST /feedback``; events without an ``event_id`` get one here, once, so a retried
        batch carries the same IDs and is logged exactly once."""
        events = [e if "event_id" in e else {**e, "event_id": uuid.uuid4().hex} for e in events]
        return self._call("POST", "/feedback", {"events": events})

    def ready(self) -> dict[str, Any]:
        """``GET /readyz`` (retried like the rest: readiness is what a rollout waits on)."""
        return self._call("GET", "/readyz", None)

    @property
    def last_attempts(self) -> int:
        """HTTP attempts of this thread's last call (1: it succeeded or failed at once)."""
        return getattr(self._local, "attempts", 0)

    @property
    def last_retry_causes(self) -> tuple[str, ...]:
        """Why each retried attempt of this thread's last call failed, e.g.
        ``("503: replica stopping",)`` or ``("ReadTimeout: ...",)``; empty when none was retried."""
        return tuple(getattr(self._local, "causes", ()))

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        policy = self.policy
        deadline = time.monotonic() + policy.deadline_s
        self._count(calls=1)
        status: int | None = None
        detail = ""
        causes: list[str] = []
        self._local.causes = causes
        for attempt in range(1, policy.max_attempts + 1):
            self._count(attempts=1)
            self._local.attempts = attempt
            retry_after: float | None = None
            timeout = max(0.05, min(policy.attempt_timeout_s, deadline - time.monotonic()))
            try:
                response = self._http.request(method, path, json=body, timeout=timeout)
            except _RETRY_ERRORS as err:
                self._count(transport_errors=1)
                status, detail = None, f"{type(err).__name__}: {err}"
            else:
                if response.status_code < 400:
                    return response.json()
                status, detail = response.status_code, _detail(response)
                if status not in RETRY_STATUSES:
                    raise RequestFailed(status, detail, attempt)
                self._count(retried_status=status)
                retry_after = _retry_after(response)
            if attempt == policy.max_attempts:
                break
            causes.append(f"{status}: {detail}"[:200] if status is not None else detail[:200])
            wait = self._wait_s(attempt, retry_after)
            if time.monotonic() + wait >= deadline:
                break
            time.sleep(wait)
        raise RequestFailed(status, detail, attempt)

    def _wait_s(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.policy.max_retry_after_s)
        cap = min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (attempt - 1))
        with self._lock:
            return self._rng.uniform(0, cap)

    def _count(self, calls: int = 0, attempts: int = 0, transport_errors: int = 0, retried_status: int | None = None) -> None:
        with self._lock:
            self.stats.calls += calls
            self.stats.attempts += attempts
            self.stats.transport_errors += transport_errors
            if retried_status is not None:
                self.stats.retried_statuses[retried_status] = self.stats.retried_statuses.get(retried_status, 0) + 1


def event_from(answer: dict[str, Any], position: int, event: str, timestamp: int | None = None) -> dict[str, Any]:
    """A ``/feedback`` event on the item a ``/recommend`` answer showed at ``position`` (0-based).

    It carries what counterfactual evaluation needs, copied from the answer: the request id,
    the versions that chose the list (index, ranker, FM) and the candidate set size, with the
    item's position. The ``event_id`` is derived from the request, item and kind, so sending the
    same event again (a retry, a double click) logs it once.
    """
    item = answer["items"][position]
    versions = {name: answer.get(name) for name in ("model_version", "ranker_version", "fm_version")}
    return {
        "event_id": f"{answer['request_id']}-{item['item_id']}-{event}",
        "user_id": answer["user_id"],
        "item_id": item["item_id"],
        "event": event,
        "timestamp": int(time.time()) if timestamp is None else timestamp,
        "request_id": answer["request_id"],
        **{name: value for name, value in versions.items() if value is not None},
        "position": position,
        "candidates": answer.get("candidates") or None,
    }


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date is treated as absent)."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    return str(detail)[:500]
