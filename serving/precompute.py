"""Speculative precompute (SOLARIS): predict the (user, item) pairs requests will need, run the FM
on them off the request path, and leave the embeddings in the shared ``FMCache``.

Two deployments:

- ``Predictor`` (exactly one replica, see its docstring) decides *what* to compute. Its model of future traffic:
  1. recently active users, scored by an exponentially decayed request/feedback count
     (half-life ``half_life_s``): the next likely users are the most active recent ones;
  2. each user's retrieval candidates: the ones the ranking stage just saw for them (pushed with
     every request batch) or, for a user known only from ``/feedback``, asked from the Ingress
     (``Ingress.retrieve``); a
     feedback event marks the user's candidates for refresh (they interacted, so what they
     will be shown next may change).
  3. a session-start signal: a ``/feedback`` event of kind ``session_start`` (an app open,
     sent before the user's first ``/recommend`` of a session;
     ``serving.feedback_log.SESSION_START_EVENT``) puts the
     user first in the next cycle, which starts at once: their candidates are retrieved afresh
     and their missing pairs computed, so the session's *first* request can hit. Without it
     the Predictor learns of a user only from their requests and feedback, and a first request
     hits only when an earlier session's rows are still cached.
  Every ``interval_s`` it takes the users whose session just started and the top
  ``users_per_cycle`` users, asks the cache which of
  their pairs are missing or about to expire, queues those and hands them to the workers in
  batches of ``batch_pairs``, at most ``max_inflight`` batches at a time (a bounded queue:
  the oldest queued pairs are dropped past ``max_queue``, they would be stale anyway).
  It asks the cache about a user only when there is news: new candidates, a request of theirs
  that missed (the cache may have lost entries, e.g. a replaced replica), a failed worker
  batch, or ``refresh_before_s / 2`` since the last check (entries near their TTL). A steady
  population of users then costs no cache calls; each call is CPU the request path shares.
- ``FMWorker`` (a pool of ``workers`` replicas) runs the FM on a batch and writes the result
  into the cache. That is FM work the request path no longer does (``rayrec_fm_offpath_pairs``).

Neither is on the request path: the ranking stage (in the Ingress) reads the cache, and on a miss falls back to the
missing-FM path instead of waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge

from serving.ranking_models import resolve_factory
from serving.retriever import Query, Recommendation

logger = logging.getLogger("ray.serve")

class PrecomputeSettings(BaseModel):
    """Knobs of the speculative precompute.

    Args:
        workers: FM worker replicas (the pool).
        worker_nice: CPU niceness added to the FM worker (0: as the request path). On a
            node shared with the request path, speculative work must only take CPU that
            requests leave idle, or it inflates the very latency it exists to cut; on a
            dedicated FM node it changes nothing. Linux niceness is per thread and Ray starts
            every worker at 15, so this only takes the worker's later threads from 15 to at most
            19 (CPU weight 36 → 15, a 2.4:1 share against a request-path thread).
        worker_idle_class: the FM computation runs in a ``SCHED_IDLE`` thread (Linux; no
            privilege needed): CPU weight 3 against the request path's 36 (12:1), so it runs
            on what requests leave over. On by default; off where FM workers own their cores.
        interval_s: seconds between predictor cycles.
        users_per_cycle: most-active users considered per cycle.
        candidates: retrieval candidates per user (the Ingress's num_candidates).
        half_life_s: activity decay half-life.
        batch_pairs: pairs per FM worker call; max_inflight: worker calls in flight.
        max_queue: pairs waiting for a worker before the oldest are dropped.
        max_users: users tracked (least recently active forgotten first).
        cache_capacity / cache_ttl_s: the FM cache bounds.
        refresh_before_s: recompute entries that expire within this many seconds.
        react_to_misses: a request that missed the cache starts a predictor cycle at once (and the
            ranking stage sends its signals at once), instead of at the next ``interval_s`` /
            ``signal_flush_s``. Users come in bursts, so this catches more of a burst. On by
            default since the FM runs in ``SCHED_IDLE`` threads (``worker_idle_class``): in
            ``make bench-serve`` on 2 shared cores it raised the hit rate 0.87 → 0.91 with p99
            1.14× the no-FM p99 (off: 1.18× in the run before; run-to-run noise is ±0.2). Before
            the idle class it cost p99 1.05× → 1.29×, which is why it was off in stop 14.
    """

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(default=1, ge=1)
    worker_nice: int = Field(default=10, ge=0, le=19)
    worker_idle_class: bool = True
    interval_s: float = Field(default=0.2, gt=0)
    users_per_cycle: int = Field(default=32, ge=1)
    candidates: int = Field(default=50, ge=1, le=1000)
    half_life_s: float = Field(default=60.0, gt=0)
    batch_pairs: int = Field(default=256, ge=1)
    max_inflight: int = Field(default=2, ge=1)
    max_queue: int = Field(default=20_000, ge=1)
    max_users: int = Field(default=100_000, ge=1)
    cache_capacity: int = Field(default=200_000, ge=1)
    cache_ttl_s: float = Field(default=600.0, gt=0)
    refresh_before_s: float = Field(default=30.0, ge=0)
    react_to_misses: bool = True


class ActivityTracker:
    """Exponentially decayed activity per user: ``score ← score · 2^(-Δt / half_life) + weight``.

    Args:
        half_life_s: decay half-life; max_users: bound (least recently touched dropped first).
    """

    def __init__(self, half_life_s: float, max_users: int, clock=time.monotonic) -> None:
        self._rate = math.log(2) / half_life_s
        self._max_users = max_users
        self._clock = clock
        self._users: OrderedDict[int, tuple[float, float]] = OrderedDict()  # user → (score, at)

    def __len__(self) -> int:
        return len(self._users)

    def touch(self, user_id: int, weight: float = 1.0) -> None:
        now = self._clock()
        score, at = self._users.pop(user_id, (0.0, now))
        self._users[user_id] = (score * math.exp(-self._rate * (now - at)) + weight, now)
        if len(self._users) > self._max_users:
            self._users.popitem(last=False)

    def top(self, n: int) -> list[int]:
        """The n users with the highest decayed score now."""
        now = self._clock()
        decayed = ((s * math.exp(-self._rate * (now - at)), u) for u, (s, at) in self._users.items())
        return [u for _, u in heapq.nlargest(n, decayed)]


def idle_class() -> bool:
    """Move the calling thread into the ``SCHED_IDLE`` class (it then gets a CPU only when no
    normal-class thread wants it; threads it starts inherit the class). Returns False where the
    platform lacks it (not Linux) or forbids it (a seccomp profile)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        return False
    return True


@serve.deployment
class FMWorker:
    """Runs the FM on batches of pairs and writes the embeddings into the cache.

    Args:
        run_dir / models_factory: where the FM comes from (see ``serving.ranking_models``).
        cache: handle to ``FMCache``.
        torch_threads: intra-op threads per worker.
        nice: CPU niceness added (``PrecomputeSettings.worker_nice``).
        idle: run the FM in ``SCHED_IDLE`` threads (``PrecomputeSettings.worker_idle_class``).
    """

    def __init__(
        self, run_dir: str, models_factory: str, cache: DeploymentHandle, torch_threads: int = 1, nice: int = 0,
        idle: bool = False,
    ) -> None:  # fmt: skip
        self._idle = idle
        self._thread = threading.local()  # per executor thread: has it tried SCHED_IDLE yet
        self._idle_threads = 0  # FM threads that entered SCHED_IDLE
        if nice:
            os.nice(nice)  # speculative work yields the CPU to the request path (PrecomputeSettings)
        torch.set_num_threads(torch_threads)
        models = resolve_factory(models_factory)(run_dir)
        if models is None or models.fm is None:
            raise ValueError(f"{models_factory} gave no foundation model for {run_dir}")
        self._fm = models.fm
        self._cache = cache
        self._pairs = Counter("rayrec_fm_offpath_pairs", description="FM pairs computed off the request path.")

    def version(self) -> str:
        return self._fm.version

    async def embed(self, user_ids: np.ndarray, item_ids: np.ndarray) -> int:
        """FM for [N] pairs → cache; returns N."""
        emb = await asyncio.to_thread(self._run, user_ids, item_ids)
        await self._cache.put.remote(user_ids, item_ids, self._fm.version, emb)
        self._pairs.inc(len(user_ids))
        return len(user_ids)

    def idle_threads(self) -> int:
        """How many FM compute threads run in ``SCHED_IDLE`` (0 when the class is off)."""
        return self._idle_threads

    @torch.no_grad()
    def _run(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        # the executor thread this runs on: into SCHED_IDLE once (torch uses this thread, 1 intra-op thread)
        if self._idle and not getattr(self._thread, "tried", False):
            self._thread.tried = True
            self._idle_threads += idle_class()
        # copies: the arrays arrive read-only from Ray's object store, which torch.from_numpy warns about
        return self._fm(torch.tensor(user_ids), torch.tensor(item_ids)).numpy().astype(np.float32)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class Predictor:
    """Predicts future pairs and keeps the FM workers busy with them (module docstring).

    Exactly one replica (``serving.app`` binds it so), because it is the app's one model of
    future traffic and its signals reach only one replica: the ranking stage's ``observe_requests`` and
    the FeedbackSink's ``observe_feedback`` are handle calls Serve routes to any replica. With 2,
    each would see about half of every user's requests, rank users on half their activity, and
    queue a user's missing pairs on both (each asks the cache before the other's FM results
    land: duplicate FM work on the CPUs the request path shares); ``reset``, ``set_paused`` and
    ``summary`` (benchmarks) would reach one of them. It is off the request path and light (a
    cycle every ``interval_s``); if it dies, precompute pauses until Serve restarts it and
    requests keep the missing-FM fallback.

    Args:
        retriever: the deployment answering ``retrieve(Query)`` (candidates of users seen only
            through feedback): a handle, or its name in this app (the Ingress, which is bound
            after the Predictor it sends signals to, so it is found by name at first use).
        cache: handle to ``FMCache``; workers: handle to the ``FMWorker`` pool.
        settings: :class:`PrecomputeSettings` as a dict.
    """

    def __init__(self, retriever: DeploymentHandle | str, cache: DeploymentHandle, workers: DeploymentHandle, settings: dict) -> None:
        self._cfg = PrecomputeSettings.model_validate(settings)
        self._retriever, self._cache, self._workers = retriever, cache, workers
        self._activity = ActivityTracker(self._cfg.half_life_s, self._cfg.max_users)
        self._candidates: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # user → candidates, LRU
        self._refresh: set[int] = set()  # users whose candidates must be fetched again
        self._starting: OrderedDict[int, None] = OrderedDict()  # session just started: first next cycle
        self._checked: dict[int, tuple[tuple[int, ...], float]] = {}  # user → (candidates, when) asked
        self._queue: OrderedDict[tuple[int, int], None] = OrderedDict()  # pairs to compute, oldest first
        self._inflight = 0
        self._version: str | None = None
        self._stats = {"cycles": 0, "dispatched_pairs": 0, "dropped_pairs": 0, "errors": 0}
        self._queue_depth = Gauge("rayrec_precompute_queue_depth", description="Pairs waiting for an FM worker.")
        self._inflight_gauge = Gauge("rayrec_precompute_inflight", description="FM worker batches in flight.")
        self._paused = False
        self._reset_at = 0.0
        self._wake = asyncio.Event()  # set by a missed request (react_to_misses): run a cycle now
        self._loop = asyncio.get_event_loop().create_task(self._run_forever())

    # ------------------------------------------------------------------ signals in
    # Every handler is ``async`` so it runs on the replica's event loop, interleaved with
    # ``_cycle`` only at its awaits: Serve would run sync handlers in a thread pool, racing the
    # cycle over the same dicts ("changed size during iteration").
    async def observe_requests(
        self, requests: list[tuple[int, list[int], float | None]], observed_at: float | None = None
    ) -> None:
        """From the ranking stage: each request's user, the candidates it was ranked over and the share
        of them the cache had (None: not read from the cache).

        ``observed_at`` (unix s, the oldest observation): observations older than the last
        :meth:`reset` are ignored, so fire-and-forget calls still in flight at a reset cannot
        undo it.
        """
        if observed_at is not None and observed_at < self._reset_at:
            return
        for user, candidates, hit_share in requests:
            self._activity.touch(user)
            self._remember(user, candidates)
            if hit_share is not None and hit_share < 1.0:
                self._checked.pop(user, None)  # it missed: look again
                if self._cfg.react_to_misses:
                    self._wake.set()  # now, not at the next interval

    async def observe_feedback(self, pairs: list[tuple[int, int]]) -> None:
        """From the FeedbackSink: users who interacted are active, their candidates may change."""
        for user, _ in pairs:
            self._activity.touch(user)
            self._refresh.add(user)

    async def observe_session_start(self, users: list[int]) -> None:
        """From the FeedbackSink: these users' sessions just started (``SESSION_START_EVENT``).

        Each goes first in a cycle that starts now, with candidates retrieved afresh (their
        history may have changed since their last session) and the cache asked again.
        """
        for user in users:
            self._activity.touch(user)
            self._refresh.add(user)
            self._checked.pop(user, None)
            self._starting.pop(user, None)
            self._starting[user] = None
        while len(self._starting) > self._cfg.max_users:
            self._starting.popitem(last=False)
        if users:
            self._wake.set()

    async def set_paused(self, paused: bool) -> None:
        """Stop/start issuing FM work (benchmarks compare precompute on and off)."""
        self._paused = paused

    async def reset(self) -> None:
        """Forget all traffic seen so far (benchmarks start each phase cold)."""
        self._reset_at = time.time()
        self._activity = ActivityTracker(self._cfg.half_life_s, self._cfg.max_users)
        self._candidates.clear()
        self._refresh.clear()
        self._starting.clear()
        self._checked.clear()
        self._queue.clear()
        self._stats = {key: 0 for key in self._stats}

    async def summary(self) -> dict[str, Any]:
        return {**self._stats, "queue_depth": len(self._queue), "inflight": self._inflight,
                "tracked_users": len(self._activity), "paused": self._paused}

    # ------------------------------------------------------------------ the loop
    async def _run_forever(self) -> None:
        while True:
            try:  # every interval_s, or at once when a request missed (react_to_misses)
                await asyncio.wait_for(self._wake.wait(), self._cfg.interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._paused:
                continue
            try:
                await self._cycle()
            except Exception:  # a dead worker or cache must not stop prediction for good
                self._stats["errors"] += 1
                logger.exception("Predictor cycle failed; retrying next cycle")

    async def _cycle(self) -> None:
        self._stats["cycles"] += 1
        if self._version is None:
            self._version = await self._workers.version.remote()
        # sessions that just started go last: their pairs are queued last, so dispatched first
        starting, self._starting = self._starting, OrderedDict()
        users = [u for u in self._activity.top(self._cfg.users_per_cycle) if u not in starting] + list(starting)
        await self._fetch_candidates([u for u in users if u in self._refresh or u not in self._candidates])
        # the candidates as asked about (observations may replace them during the await)
        asked = {u: self._candidates[u] for u in users if u in self._candidates and self._needs_check(u)}
        if asked:
            u = np.asarray([u for u, items in asked.items() for _ in items], dtype=np.int64)
            i = np.asarray([i for items in asked.values() for i in items], dtype=np.int64)
            missing = await self._cache.missing.remote(u, i, self._version, self._cfg.refresh_before_s)
            now = time.monotonic()
            for user, items in asked.items():
                self._checked[user] = (items, now)
            for user, item in zip(u[missing].tolist(), i[missing].tolist()):
                self._queue[(user, item)] = None
                self._queue.move_to_end((user, item))  # the freshest demand last (``_dispatch``)
            while len(self._queue) > self._cfg.max_queue:
                (user, _), _ = self._queue.popitem(last=False)
                self._checked.pop(user, None)
                self._stats["dropped_pairs"] += 1
        self._dispatch()
        self._queue_depth.set(len(self._queue))
        self._inflight_gauge.set(self._inflight)
        if self._stats["cycles"] % 25 == 0:
            self._cache.summary.remote()  # refreshes the cache's Prometheus gauges

    def _needs_check(self, user: int) -> bool:
        """Whether the cache must be asked about this user's pairs (module docstring)."""
        checked = self._checked.get(user)
        if checked is None:
            return True
        candidates, at = checked
        return candidates != self._candidates[user] or time.monotonic() - at > self._cfg.refresh_before_s / 2

    async def _fetch_candidates(self, users: list[int]) -> None:
        if not users:
            return
        if isinstance(self._retriever, str):
            self._retriever = serve.get_deployment_handle(self._retriever, serve.get_replica_context().app_name)
        replies: list[Recommendation] = await asyncio.gather(
            *(self._retriever.retrieve.remote(Query(user_id=u, k=self._cfg.candidates)) for u in users)
        )
        for user, reply in zip(users, replies):
            self._refresh.discard(user)
            if reply.fallback is None:  # cold users get popularity: nothing personal to precompute
                self._remember(user, reply.item_ids)

    def _remember(self, user: int, candidates: list[int]) -> None:
        self._candidates.pop(user, None)
        self._candidates[user] = tuple(candidates)
        if len(self._candidates) > self._cfg.max_users:
            forgotten, _ = self._candidates.popitem(last=False)
            self._checked.pop(forgotten, None)

    def _dispatch(self) -> None:
        """Hand queued pairs to the workers, most recently queued first (the freshest demand)."""
        while self._queue and self._inflight < self._cfg.max_inflight:
            batch = []
            while self._queue and len(batch) < self._cfg.batch_pairs:
                batch.append(self._queue.popitem(last=True)[0])
            users = np.asarray([u for u, _ in batch], dtype=np.int64)
            items = np.asarray([i for _, i in batch], dtype=np.int64)
            self._inflight += 1
            self._stats["dispatched_pairs"] += len(batch)
            response = self._workers.embed.remote(users, items)
            asyncio.get_event_loop().create_task(self._settle(response))

    async def _settle(self, response: Any) -> None:
        try:
            await response
        except Exception:
            self._stats["errors"] += 1
            self._checked.clear()  # which pairs it held is unknown now: ask the cache again
            logger.exception("FM worker batch failed")
        finally:
            self._inflight -= 1
            self._dispatch()
