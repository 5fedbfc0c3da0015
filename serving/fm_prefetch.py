"""Read a user's precomputed FM rows while the Retriever searches (the Ingress's half of SOLARIS).

Why: the Ranker needs the FM rows of its candidates, and the candidates exist only after
retrieval, so a read by the Ranker is one more serial hop on every request (about 5 ms at p50
on 2 cores, more at p99). The user is known at once, and the cache indexes rows by user, so the
Ingress starts ``FMCache.user_rows(user)`` next to the retrieval call; by the time the
candidates arrive the rows usually have too, and they ride along in the ``RankQuery``.

Degrades like the Ranker's own read: a read slower than ``timeout_s`` is abandoned (the request
ranks without FM rather than wait) and opens a breaker for ``retry_s``, so an FM cache outage
costs one timeout, not one per request. It only prefetches while the Ranker is in ``cache``
mode (learned from its answers), so ``off`` and ``sync`` serving pay nothing for it.
"""

from __future__ import annotations

from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.fm_cache import ReadBreaker, UserRows


class FMPrefetch:
    """Starts and settles one user-rows read per request.

    Args:
        cache: handle to ``FMCache``.
        timeout_s: the longest a settled read may keep a request waiting after retrieval.
        retry_s: after a failed or abandoned read, skip prefetching this long.
    """

    def __init__(self, cache: DeploymentHandle, timeout_s: float = 0.25, retry_s: float = 1.0) -> None:
        self._cache = cache
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._breaker = ReadBreaker()
        self.active = True  # the Ranker was in "cache" mode at its last answer

    def start(self, user_id: int) -> Any | None:
        """The in-flight read (a ``DeploymentResponse``), or None when not prefetching now."""
        if not self.active or self._breaker.open:
            return None
        return self._cache.user_rows.remote(user_id)

    async def settle(self, user_id: int, pending: Any | None) -> UserRows | None:
        """The rows, ``UserRows.failed`` on a failed or slow read, None when nothing was started
        (then the Ranker reads the cache itself)."""
        if pending is None:
            return None
        rows = await self._breaker.read(pending, self._timeout_s, self._retry_s, "FM prefetch")
        return UserRows.failed(user_id) if rows is None else rows

    def observe_mode(self, fm_mode: str) -> None:
        """Follow the Ranker's live ``fm_mode`` (from each answer)."""
        self.active = fm_mode == "cache"
