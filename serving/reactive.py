"""Reactive FM cache fill: the textbook cache that SOLARIS precompute is measured against.

``fm_mode`` ``reactive`` (``serving.ranker.RankerLiveConfig``): a request reads the FM cache
exactly as ``cache`` (precompute) does and ranks its missing pairs on the ranker's missing-FM
path, without waiting; then the pairs it missed are handed to the same ``FMWorker`` pool, which
runs the FM off the request path and writes the rows into the same ``FMCache`` (same capacity
and TTL: the rows stay for the session). No prediction: nothing is computed for a pair until a
request has missed it, so a session's first request always misses and its repeats hit once the
FM has landed. The difference between this and ``cache`` is exactly what the Predictor adds.

One :class:`MissFiller` per Ingress replica (inside its ``RankingService``). It only remembers
which pairs it has in flight, so a burst of requests for the same user asks the FM once; it keeps
at most ``max_inflight_pairs`` pairs in flight and drops the rest (a later miss asks again), so
an overload cannot queue FM work without bound.

Example::

    filler = MissFiller(workers)          # a handle to the FMWorker pool
    filler.fill(np.array([7, 7]), np.array([3, 4]))   # [N] users, [N] items: 2 pairs sent
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

logger = logging.getLogger("ray.serve")

DEFAULT_BATCH_PAIRS = 256
"""Pairs per FM worker call (``PrecomputeSettings.batch_pairs``'s default)."""
DEFAULT_MAX_INFLIGHT_PAIRS = 4096
"""Pairs in flight per Ingress replica before further misses are dropped."""


class MissFiller:
    """Sends a request's missed (user, item) pairs to the FM workers, fire and forget.

    Args:
        workers: handle to the ``FMWorker`` pool (``embed(users [N], items [N])`` writes the cache).
        batch_pairs: pairs per worker call.
        max_inflight_pairs: pairs in flight before new misses are dropped.
    """

    def __init__(self, workers: Any, batch_pairs: int = DEFAULT_BATCH_PAIRS,
                 max_inflight_pairs: int = DEFAULT_MAX_INFLIGHT_PAIRS) -> None:  # fmt: skip
        self._workers = workers
        self._batch_pairs = batch_pairs
        self._max_inflight = max_inflight_pairs
        self._inflight: set[tuple[int, int]] = set()
        self._tasks: set[asyncio.Task] = set()  # held so the loop does not drop them
        self.stats = {"sent_pairs": 0, "dropped_pairs": 0, "errors": 0}

    @property
    def inflight(self) -> int:
        """Pairs sent and not yet settled."""
        return len(self._inflight)

    def fill(self, user_ids: np.ndarray, item_ids: np.ndarray) -> int:
        """Ask the FM for the pairs ``(user_ids[n], item_ids[n])`` not already in flight; returns
        how many were sent. Must run on the replica's event loop (it starts tasks)."""
        fresh = list(dict.fromkeys(p for p in zip(user_ids.tolist(), item_ids.tolist()) if p not in self._inflight))
        room = max(0, self._max_inflight - len(self._inflight))
        self.stats["dropped_pairs"] += max(0, len(fresh) - room)
        fresh = fresh[:room]
        for start in range(0, len(fresh), self._batch_pairs):
            batch = fresh[start : start + self._batch_pairs]
            self._inflight.update(batch)
            task = asyncio.get_event_loop().create_task(self._embed(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.stats["sent_pairs"] += len(fresh)
        return len(fresh)

    async def _embed(self, batch: list[tuple[int, int]]) -> None:
        users = np.asarray([u for u, _ in batch], dtype=np.int64)
        items = np.asarray([i for _, i in batch], dtype=np.int64)
        try:
            await self._workers.embed.remote(users, items)
        except Exception as err:  # a dead worker: the pairs miss again and are asked again
            self.stats["errors"] += 1
            logger.warning("reactive FM fill of %d pairs failed (%s)", len(batch), type(err).__name__)
        finally:
            self._inflight.difference_update(batch)
