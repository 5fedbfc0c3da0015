"""The precompute cache: FM embeddings keyed by (user, item, fm_version), bounded, TTL + LRU.

SOLARIS splits the foundation model (FM) off the request path: precompute workers write the
FM's user–item embedding here ahead of requests. One ``FMCache`` replica is shared by every
ranker replica, so a pair precomputed once serves whichever replica gets the request.

Two ways to read it:
- ``get(users, items)``: the pairs of a batch, one call after retrieval: how the ranking stage in
  each Ingress replica reads it (one call per request batch; ``serving.ranker``).
- ``user_rows(user)``: every live row of one user, for a caller that reads ahead of retrieval
  (it knows the user before the candidates) and passes the rows in ``RankQuery.fm_rows``; the
  ranking stage then reports what it used with ``record_reads`` (fire and forget) so hit rate,
  precision, staleness and LRU order stay true. The Ingress used to read this way, one call
  per request in parallel with the Retriever deployment; with retrieval in process one read per
  batch costs less (docs/benchmarks/serving.md).

Why a key includes the FM version: after a rollout an old embedding is a feature of another
model; reading it would be silently wrong, so a new version simply misses (and the old entries
age out by TTL/LRU; ``stale_entries`` counts them meanwhile).

Telemetry (also Prometheus gauges/counters, tag-free):
    hit_rate              hits / lookups
    speculation_precision precomputed entries read at least once / entries inserted
    hit_age_s             mean age of the entries read (staleness)
    stale_entries         entries of an FM version other than the latest written (version lag)
    entries, evicted_unused, expired
    user_reads            ``user_rows`` calls (reads ahead of ranking; summary only)

Notation: N pairs, D FM width.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve
from ray.serve.metrics import Counter, Gauge

logger = logging.getLogger("ray.serve")

Key = tuple[int, int, str]  # (user_id, item_id, fm_version)


@dataclass
class _Entry:
    emb: np.ndarray  # [D] float32
    created: float
    used: bool = False


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    inserted: int = 0
    used: int = 0
    evicted_unused: int = 0
    expired: int = 0
    hit_age_sum_s: float = 0.0
    user_reads: int = 0  # user_rows calls (reads ahead of ranking)
    latest_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UserRows:
    """The cache's rows for one user, read ahead of ranking (see the module docstring).

    Args:
        user_id: whose rows.
        items: [M] int64 item ids; versions: [M] FM versions; emb: [M, D] float32.
        ok: False when the read failed or timed out (the request ranks without FM, and the
            ranking stage must not read the cache again for it).
    """

    user_id: int
    items: np.ndarray
    versions: tuple[str, ...]
    emb: np.ndarray
    ok: bool = True

    @classmethod
    def failed(cls, user_id: int) -> "UserRows":
        return cls(user_id, np.empty(0, np.int64), (), np.empty((0, 0), np.float32), ok=False)

    def lookup(self, item_ids: np.ndarray, version: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``item_ids`` [N] for ``version``: (emb [N, D] zeros where missing, present [N])."""
        emb = np.zeros((len(item_ids), dim), dtype=np.float32)
        present = np.zeros(len(item_ids), dtype=bool)
        if len(self.items):
            row_of = {i: r for r, (i, v) in enumerate(zip(self.items.tolist(), self.versions)) if v == version}
            for n, item in enumerate(item_ids.tolist()):
                row = row_of.get(item)
                if row is not None:
                    emb[n], present[n] = self.emb[row], True
        return emb, present


class ReadBreaker:
    """How a request-path reader reads the cache: a read slower than ``timeout_s`` is abandoned
    and a failed one opens the breaker for ``retry_s``, so an outage costs one timeout rather
    than one per request. The ranking stage's read holds one.
    """

    def __init__(self) -> None:
        self._down_until = 0.0  # monotonic time until which reads are skipped

    @property
    def open(self) -> bool:
        """True while reads are being skipped after a failure."""
        return time.monotonic() < self._down_until

    async def read(self, pending: Any, timeout_s: float, retry_s: float, what: str) -> Any | None:
        """``await pending`` within ``timeout_s``; None (and the breaker open) if it fails."""
        try:
            return await asyncio.wait_for(pending, timeout=timeout_s)
        except Exception as err:  # overloaded, timed out or its replica died
            self._down_until = time.monotonic() + retry_s
            logger.warning("%s failed (%s); skipping it for %.1fs", what, type(err).__name__, retry_s)
            return None


class PairCache:
    """The cache itself, plain Python (tests drive it directly; ``FMCache`` serves it).

    Args:
        capacity: most entries kept; the least recently used goes first.
        ttl_s: entries older than this are dropped on read.
        clock: seconds, monotonic (injectable so tests can age entries).

    Example::

        cache = PairCache(capacity=10_000, ttl_s=300)
        cache.put(np.array([1]), np.array([7]), "v1", np.ones((1, 8), np.float32))
        emb, present, ages = cache.get(np.array([1, 1]), np.array([7, 8]), "v1")  # present [T, F]
    """

    def __init__(self, capacity: int, ttl_s: float, clock=time.monotonic) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._by_user: dict[int, set[Key]] = {}  # user → its keys (user_rows without a scan)
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, emb: np.ndarray) -> int:
        """Insert N rows (``emb`` [N, D]); returns how many were new."""
        now = self._clock()
        new = 0
        self.stats.latest_version = version
        for u, i, row in zip(user_ids.tolist(), item_ids.tolist(), emb):
            key = (u, i, version)
            if key not in self._entries:
                new += 1
                self._by_user.setdefault(u, set()).add(key)
            self._entries[key] = _Entry(np.asarray(row, dtype=np.float32), now)
            self._entries.move_to_end(key)
        self.stats.inserted += new
        while len(self._entries) > self.capacity:
            key, dropped = self._entries.popitem(last=False)
            self._unindex(key)
            self.stats.evicted_unused += not dropped.used
        return new

    def _unindex(self, key: Key) -> None:
        keys = self._by_user.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[key[0]]

    def _expire(self, key: Key, entry: _Entry) -> None:
        del self._entries[key]
        self._unindex(key)
        self.stats.expired += 1
        self.stats.evicted_unused += not entry.used

    def get(
        self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, dim: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Look up N pairs.

        Returns:
            emb [N, D] float32 (zeros where missing), present [N] bool, age_s [N] (NaN if missing).
        """
        n = len(user_ids)
        emb = np.zeros((n, dim), dtype=np.float32)
        present = np.zeros(n, dtype=bool)
        ages = np.full(n, np.nan)
        now = self._clock()
        for row, (u, i) in enumerate(zip(user_ids.tolist(), item_ids.tolist())):
            key = (u, i, version)
            entry = self._entries.get(key)
            if entry is None:
                continue
            age = now - entry.created
            if age > self.ttl_s:
                self._expire(key, entry)
                continue
            self._touch(key, entry)
            emb[row], present[row], ages[row] = entry.emb, True, age
        self._count_reads(n, ages)
        return emb, present, ages

    def user_rows(self, user_id: int) -> UserRows:
        """Every live row of one user, any FM version; not counted as a lookup (the reader
        reports what it used with :meth:`record_reads`)."""
        now = self._clock()
        self.stats.user_reads += 1
        keys, rows = [], []
        for key in list(self._by_user.get(user_id, ())):
            entry = self._entries[key]
            if now - entry.created > self.ttl_s:
                self._expire(key, entry)
                continue
            keys.append(key)
            rows.append(entry.emb)
        items = np.asarray([k[1] for k in keys], dtype=np.int64)
        emb = np.stack(rows) if rows else np.empty((0, 0), np.float32)
        return UserRows(user_id, items, tuple(k[2] for k in keys), emb)

    def record_reads(self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, present: np.ndarray) -> None:
        """Account N pairs a reader looked up in :meth:`user_rows` results, exactly as
        :meth:`get` would have: lookups, hits, staleness, the used flag and LRU order."""
        now = self._clock()
        ages = np.full(len(user_ids), np.nan)
        for row, (u, i) in enumerate(zip(user_ids.tolist(), item_ids.tolist())):
            if not present[row]:
                continue
            key = (u, i, version)
            entry = self._entries.get(key)
            if entry is None:  # evicted since it was read: still a hit for the request
                ages[row] = 0.0
                continue
            self._touch(key, entry)
            ages[row] = now - entry.created
        self._count_reads(len(user_ids), ages)

    def _touch(self, key: Key, entry: _Entry) -> None:
        self._entries.move_to_end(key)
        if not entry.used:
            entry.used = True
            self.stats.used += 1

    def _count_reads(self, n: int, ages: np.ndarray) -> None:
        """ages [n]: the age of each hit, NaN for a miss."""
        hits = int(np.count_nonzero(~np.isnan(ages)))
        self.stats.lookups += n
        self.stats.hits += hits
        self.stats.hit_age_sum_s += float(np.nansum(ages))

    def missing(self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, fresh_for_s: float = 0.0) -> np.ndarray:
        """[N] bool: pairs with no entry that stays valid for ``fresh_for_s`` more seconds.

        The predictor asks this before spending FM work; it does not count as a lookup.
        """
        now = self._clock()
        out = np.ones(len(user_ids), dtype=bool)
        for row, (u, i) in enumerate(zip(user_ids.tolist(), item_ids.tolist())):
            entry = self._entries.get((u, i, version))
            out[row] = entry is None or now - entry.created + fresh_for_s > self.ttl_s
        return out

    def summary(self) -> dict[str, float | int | str]:
        s = self.stats
        stale = sum(1 for (_, _, v) in self._entries if v != s.latest_version)
        return {
            "entries": len(self._entries),
            "lookups": s.lookups,
            "hits": s.hits,
            "hit_rate": s.hits / s.lookups if s.lookups else 0.0,
            "inserted": s.inserted,
            "used": s.used,
            "speculation_precision": s.used / s.inserted if s.inserted else 0.0,
            "hit_age_s": s.hit_age_sum_s / s.hits if s.hits else 0.0,
            "stale_entries": stale,
            "evicted_unused": s.evicted_unused,
            "expired": s.expired,
            "user_reads": s.user_reads,
            "latest_version": s.latest_version,
        }

    def reset_stats(self) -> None:
        """Zero the counters (benchmarks measure one phase at a time); entries stay."""
        latest = self.stats.latest_version
        self.stats = CacheStats(latest_version=latest)
        for entry in self._entries.values():
            entry.used = False

    def clear(self) -> None:
        """Drop every entry and zero the counters (a cold cache)."""
        self._entries.clear()
        self._by_user.clear()
        self.stats = CacheStats()


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class FMCache:
    """One shared ``PairCache`` for all ranker replicas and precompute workers.

    Exactly one replica (``serving.app`` binds it so, whatever the autoscaling settings), because
    the replicas would not share their entries and Serve routes each call to any replica, with
    no key affinity:

    - a row an FMWorker ``put`` lands on one replica; a later ``user_rows`` or ``get`` for it
      goes to the other with probability 1/2, so 2 replicas would halve the hit rate (about 0.9
      in ``make bench-serve`` → an expected 0.45) and waste half the precompute;
    - the Predictor's ``missing`` asks one replica about rows another holds, so it queues them
      again (duplicate FM work), and ``summary`` (hit rate, precision, staleness) describes one
      replica's fragment;
    - replicating instead would need every ``put`` on every replica: a Serve handle sends a call
      to one replica, there is no broadcast. Sharding by user would need every call split per
      shard (``put``/``get``/``missing``/``record_reads`` carry the pairs of many users) plus a
      user-affine router: a change of the graph, not of this class.

    What one replica costs: its throughput (async methods, a few hundred dict operations per
    call, one event loop) and a cold cache when it restarts, which requests survive on the
    missing-FM path (``RankerLiveConfig.cache_timeout_s`` and the read breaker) while the
    Predictor refills it (their misses wake it).

    Its methods are ``async`` on purpose: Serve runs a deployment's sync methods in a thread
    pool, and ``PairCache`` (an ``OrderedDict`` reordered on every read) is not thread-safe; on
    the replica's event loop the calls run one at a time, and each is a few hundred dict
    operations, so serialising them costs nothing.

    Args:
        capacity / ttl_s: see :class:`PairCache`.
    """

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self._cache = PairCache(capacity, ttl_s)
        self._hits = Counter("rayrec_fm_cache_hits", description="FM cache lookups that hit.")
        self._lookups = Counter("rayrec_fm_cache_lookups", description="FM cache lookups (pairs).")
        self._gauges = {
            name: Gauge(f"rayrec_fm_cache_{name}", description=desc)
            for name, desc in {
                "entries": "Entries in the FM cache.",
                "hit_rate": "Cumulative FM cache hit rate.",
                "speculation_precision": "Share of precomputed FM entries read at least once.",
                "hit_age_s": "Mean age of the FM entries read (staleness, seconds).",
                "stale_entries": "Entries of an older FM version (version lag).",
            }.items()
        }

    async def put(self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, emb: np.ndarray) -> int:
        return self._cache.put(user_ids, item_ids, version, emb)

    async def get(
        self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, dim: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """See :meth:`PairCache.get`; ``dim`` is the FM width (the width of rows for misses)."""
        emb, present, ages = self._cache.get(user_ids, item_ids, version, dim)
        if len(present):
            self._lookups.inc(len(present))
        if present.any():
            self._hits.inc(int(present.sum()))
        return emb, present, ages

    async def user_rows(self, user_id: int) -> UserRows:
        """See :meth:`PairCache.user_rows` (a read ahead of retrieval)."""
        return self._cache.user_rows(user_id)

    async def record_reads(self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, present: np.ndarray) -> None:
        """See :meth:`PairCache.record_reads` (the ranking stage, after ranking rows read ahead)."""
        self._cache.record_reads(user_ids, item_ids, version, present)
        if len(present):
            self._lookups.inc(len(present))
        if present.any():
            self._hits.inc(int(present.sum()))

    async def missing(self, user_ids: np.ndarray, item_ids: np.ndarray, version: str, fresh_for_s: float = 0.0) -> np.ndarray:
        return self._cache.missing(user_ids, item_ids, version, fresh_for_s)

    async def summary(self) -> dict[str, float | int | str]:
        summary = self._cache.summary()
        for name, gauge in self._gauges.items():
            gauge.set(float(summary[name]))
        return summary

    async def reset_stats(self) -> None:
        self._cache.reset_stats()

    async def clear(self) -> None:
        self._cache.clear()
