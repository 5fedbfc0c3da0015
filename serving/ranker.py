"""The ranking stage: retrieval candidates → multi-task scores → value model → top-k.

It runs inside the Ingress replica, on the batch of requests that replica just retrieved for
(``serving.ingress``: one batch goes through retrieval and ranking together). Per batch of B
requests, each with C candidates:

1. FM features for the B·C pairs, by ``fm_mode`` (a live setting):
   ``cache``: the shared ``FMCache``'s precomputed rows (SOLARIS), one read of the cache for the
   whole batch (``FMCache.get``; rows a caller already holds can ride in ``RankQuery.fm_rows``);
   misses take the ranker's learned *missing* path. ``reactive``: the same read and fallback, and
   the missed pairs go to the FM workers to be cached for the session's next requests, with no
   prediction (``serving.reactive``: the cache baseline precompute is measured against; the
   Predictor is sent nothing). ``sync``: the FM runs here, in the request
   path (the quality ceiling and the latency floor precompute is measured against). ``off``:
   every pair takes the missing path.
2. ``scorer.score(users [P], candidates [P], fm [P, D], present [P])`` once for the batch's
   P = Σ C pairs → per-task predictions and MBD stats ``[P]``.
3. The value model (``training.models.value.ValueModel``, config only) → one score ``[P]``;
   top-k per request.
4. The (user, candidates, hit share) of each request go to the precompute ``Predictor``: an
   active user is likely to come back for the same candidates, and a miss on a user it thinks
   is precomputed tells it to look again (the cache may have been replaced). These signals and
   the cache's read accounting are buffered and sent every ``signal_flush_s`` by a background
   task, not per batch: on 2 cores each actor call costs about a millisecond of CPU in the
   caller and in the callee, which the request path pays for in queueing. With
   ``react_to_misses`` a batch with a cache miss flushes at once (see ``PrecomputeSettings``).

The value config and ``fm_mode`` are live (:class:`RankerLiveConfig`, the ``ranker`` part of the
Ingress's ``user_config``): a declarative redeploy with a new one (``serve deploy``, a RayService
update, ``serving.app.deploy_declaratively``) reaches the live replicas through ``reconfigure``:
no restart, no dropped request. The torch work runs in a worker thread so the replica keeps
accepting requests while it computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from serving.fm_cache import ReadBreaker, UserRows
from serving.ranking_models import RankingModels
from serving.reactive import MissFiller
from training.models.value import ValueConfig, ValueModel, check_value_config

logger = logging.getLogger("ray.serve")

FMMode = Literal["cache", "reactive", "sync", "off"]


class RankerLiveConfig(BaseModel):
    """The ranking stage's live config (``ranker`` in the Ingress's ``user_config``): everything
    here changes without a restart.

    Args:
        value: value-model terms; None: the config the ranker was trained with.
        fm_mode: where FM features come from (module docstring).
        cache_timeout_s: a cache read slower than this is abandoned and the batch ranks without
            FM (a dead or replaced cache replica must not stall the request path).
        cache_retry_s: after a failed or abandoned read, skip the cache this long (a circuit
            breaker: during an outage requests do not each pay the timeout).
        signal_flush_s: how often buffered traffic signals (to the Predictor) and read
            accounting (to the FMCache) are sent.

    Batching is the Ingress's (``ServingSettings.max_batch_size``): one batch is retrieved and
    ranked together.
    """

    model_config = ConfigDict(extra="forbid")

    value: ValueConfig | None = None
    fm_mode: FMMode = "cache"
    cache_timeout_s: float = Field(default=0.25, gt=0)
    cache_retry_s: float = Field(default=1.0, ge=0)
    signal_flush_s: float = Field(default=0.2, gt=0)


@dataclass(frozen=True)
class RankQuery:
    """One request: a user, the Retriever's candidates (best first) and how many to keep.

    ``fm_rows``: the user's FM cache rows when the caller already holds them (``FMCache.user_rows``;
    None, as the Ingress sends: the stage reads the cache itself, once per batch; ``ok=False``: a
    read that failed, rank this request without FM).

    ``context``: the request's context (``serving.schemas.RecommendRequest.context``, flat key →
    str / bool / int / float). It reaches the ranking stage with the candidates; no scorer reads
    a context feature yet (``CandidateScorer.score`` takes none), so today it changes no score.
    """

    user_id: int
    candidates: list[int]
    k: int
    fm_rows: UserRows | None = None
    context: Mapping[str, str | bool | int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class Ranked:
    """The Ranker's answer: up to k items by value, plus where the FM features came from.

    Args:
        item_ids / scores: best first; scores are value-model scores.
        fm_from_cache: share of this request's candidates whose FM came from the cache
            (None when the ranker has no FM or ``fm_mode`` is neither ``cache`` nor ``reactive``).
        fm_mode: the mode used.
        rank_ms: the batch's scoring time; fm_ms: time spent getting FM features.
        version: the ranker's version.
        fm_version: the FM whose features were read (None: no FM, or ``fm_mode`` off).
    """

    item_ids: list[int]
    scores: list[float]
    fm_from_cache: float | None
    fm_mode: str
    rank_ms: float
    fm_ms: float
    version: str
    fm_version: str | None = None


class RankingStage:
    """Scoring + value + top-k for a batch, given FM rows; plain Python (in-process benchmarks).

    Args:
        models: the run's :class:`RankingModels`.
        value: the value config in force.
    """

    def __init__(self, models: RankingModels, value: ValueConfig | None = None) -> None:
        self.models = models
        self.set_value(value or models.value)

    def set_value(self, value: ValueConfig) -> None:
        """Score with ``value`` from now on; ValueError (and the old config kept) when it weights
        a signal the models do not predict or asks ``z``/``pct`` of one MBD does not debias."""
        check_value_config(value, self.models.signals, self.models.families)
        self.value = value
        self.value_model = ValueModel.from_config(value, self.models.families)

    def compute_fm(self, queries: list[RankQuery]) -> tuple[torch.Tensor, torch.Tensor]:
        """Synchronous FM for every pair: ([P, D], present [P] all True), P = Σ candidates."""
        assert self.models.fm is not None
        users, items = pairs_of(queries)
        return self.models.fm(torch.from_numpy(users), torch.from_numpy(items)), torch.ones(len(users), dtype=torch.bool)

    @torch.no_grad()
    def rank(self, queries: list[RankQuery], fm: torch.Tensor | None, present: torch.Tensor | None) -> list[tuple[list[int], list[float]]]:
        """Top-k per query. ``fm`` [P, D] and ``present`` [P] follow :func:`pairs_of`'s order.

        One forward pass for the whole batch (rows do not interact): B requests cost one call's
        fixed work (feature assembly, id lookups, launch overhead) instead of B.
        """
        users, items = pairs_of(queries)
        if len(items) == 0:
            return [([], []) for _ in queries]
        if fm is None:
            result = self.models.scorer.score(users, items)
        else:
            result = self.models.scorer.score(users, items, fm=fm, fm_present=present)
        value = self.value_model(result)  # [P]
        out: list[tuple[list[int], list[float]]] = []
        start = 0
        for q in queries:
            n = len(q.candidates)
            rows = slice(start, start + n)
            start += n
            if n == 0:
                out.append(([], []))
                continue
            top = torch.topk(value[rows], min(q.k, n))
            out.append((items[rows][top.indices.numpy()].tolist(), top.values.tolist()))
        return out


def pairs_of(queries: list[RankQuery]) -> tuple[np.ndarray, np.ndarray]:
    """Every (user, candidate) pair of a batch, query by query: ([P] users, [P] items) int64."""
    if not queries:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    users = np.concatenate([np.full(len(q.candidates), q.user_id, dtype=np.int64) for q in queries])
    items = np.concatenate([np.asarray(q.candidates, dtype=np.int64) for q in queries])
    return users, items


class RankingService:
    """The ranking stage as the Ingress replica runs it: a :class:`RankingStage` with the FM cache
    in front, the live config, the precompute signals and the stage's metrics.

    Plain Python, not a deployment: it ranks in the replica that retrieved the candidates (one
    hop per request instead of three; ``serving.ingress`` says why), and must be built inside
    that replica (its metrics and its signal task need Serve's replica context and event loop).

    Args:
        models: the run's :class:`RankingModels`.
        cache: handle to ``FMCache`` (None: precompute disabled; ``cache`` mode acts as ``off``).
        predictor: handle to the ``Predictor`` (None: nothing is told about traffic).
        react_to_misses: send the Predictor a batch's signals at once when it had a cache miss
            (``PrecomputeSettings.react_to_misses``).
        workers: handle to the ``FMWorker`` pool (None: ``reactive`` mode reads the cache but
            fills nothing).
    """

    def __init__(
        self,
        models: RankingModels,
        cache: DeploymentHandle | None = None,
        predictor: DeploymentHandle | None = None,
        react_to_misses: bool = True,
        workers: DeploymentHandle | None = None,
    ) -> None:
        self._react_to_misses = react_to_misses
        self._filler = MissFiller(workers) if workers is not None else None
        self._stage = RankingStage(models)
        self._cache = cache
        self._predictor = predictor
        self._live = RankerLiveConfig()
        self._rejected: str | None = None  # why the last live config was rejected (reconfigure)
        self._cache_breaker = ReadBreaker()
        self._observed: list[tuple[int, list[int], float | None]] = []  # for the Predictor
        self._observed_since = 0.0  # unix time of the oldest buffered observation
        self._reads: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # for FMCache.record_reads
        self._flusher = asyncio.get_event_loop().create_task(self._flush_forever())
        self._batch_sizes = Histogram(
            "rayrec_ranker_batch_size", description="Requests per ranker batch.", boundaries=[1, 2, 4, 8, 16, 32, 64]
        )
        self._fm_pairs = Counter(
            "rayrec_fm_pairs", description="FM features per source (cache hit, cache miss, sync, off).", tag_keys=("source",)
        )

    @property
    def version(self) -> str:
        return self._stage.models.version

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new live config whole, or reject it whole and keep serving the one in force.

        Rejected: a config that fails :class:`RankerLiveConfig` or whose value config cannot
        score this ranker's outputs (:meth:`RankingStage.set_value`); accepting it would fail
        every request. Rejected, not raised: Serve stops a replica whose ``reconfigure`` raises
        and starts another with the same config, so raising would take the app down rather
        than protect it. The rejection is logged and reported by :meth:`info`
        (``rejected_config``), which ``serving.app.deploy_declaratively`` checks so the deploy
        that sent it fails loudly. At start, "the one in force" is the defaults with the value
        config the ranker was trained with.
        """
        try:
            live = RankerLiveConfig.model_validate(config)
            self._stage.set_value(live.value or self._stage.models.value)  # checks before it changes anything
        except ValueError as err:  # pydantic's ValidationError is one
            self._rejected = str(err)
            logger.error("Ranker rejected live config %s: %s; still serving fm_mode=%s value=%s",
                         config, err, self._live.fm_mode, self._stage.value.model_dump())  # fmt: skip
            return
        self._live = live
        self._rejected = None
        logger.info("Ranker reconfigured: fm_mode=%s value=%s", live.fm_mode, self._stage.value.model_dump())

    async def rank(self, queries: list[RankQuery]) -> list[Ranked]:
        """Rank a batch: FM features (one cache read for the batch), one forward pass in a worker
        thread, top-k per query, and the batch's signals buffered for the Predictor."""
        self._batch_sizes.observe(len(queries))
        mode = self._live.fm_mode
        fm_start = time.perf_counter()
        fm, present, per_query_hits = await self._fm_features(queries, mode)
        fm_used = fm is not None
        fm_ms = (time.perf_counter() - fm_start) * 1e3
        if mode == "reactive":  # ask for the misses now: the FM runs while this batch ranks
            self._fill_misses(queries, present)
        start = time.perf_counter()
        ranked = await asyncio.to_thread(self._stage.rank, queries, fm, present)
        rank_ms = (time.perf_counter() - start) * 1e3
        if self._predictor is not None and mode != "reactive":  # reactive tells the Predictor nothing
            if not self._observed:
                self._observed_since = time.time()
            self._observed += [(q.user_id, q.candidates, hits) for q, hits in zip(queries, per_query_hits)]
            if self._react_to_misses and any(hits is not None and hits < 1.0 for hits in per_query_hits):
                self._flush()  # a miss is news the Predictor acts on now, not at the next flush
        fm = self._stage.models.fm
        fm_version = fm.version if fm is not None and fm_used else None
        return [
            Ranked(ids, scores, hits, mode, rank_ms, fm_ms, self._stage.models.version, fm_version)
            for (ids, scores), hits in zip(ranked, per_query_hits)
        ]

    async def _fm_features(
        self, queries: list[RankQuery], mode: FMMode
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[float | None]]:
        fm_model = self._stage.models.fm
        none: list[float | None] = [None] * len(queries)
        if fm_model is None or mode == "off" or (mode in ("cache", "reactive") and self._cache is None):
            self._count_fm("off", sum(len(q.candidates) for q in queries))
            return None, None, none
        if mode == "sync":
            fm, present = await asyncio.to_thread(self._stage.compute_fm, queries)
            self._count_fm("sync", len(present))
            return fm, present, none
        version, dim = fm_model.version, fm_model.dim
        emb = np.zeros((sum(len(q.candidates) for q in queries), dim), dtype=np.float32)
        hit = np.zeros(len(emb), dtype=bool)
        offsets = np.cumsum([0] + [len(q.candidates) for q in queries])
        unread = [n for n, q in enumerate(queries) if q.fm_rows is None]
        failed = {n for n, q in enumerate(queries) if q.fm_rows is not None and not q.fm_rows.ok}
        prefetched = [n for n, q in enumerate(queries) if q.fm_rows is not None and q.fm_rows.ok]
        for n in prefetched:  # rows the caller passed: pick the candidates' rows
            rows = slice(offsets[n], offsets[n + 1])
            emb[rows], hit[rows] = queries[n].fm_rows.lookup(np.asarray(queries[n].candidates, dtype=np.int64), version, dim)
        if prefetched and self._cache is not None:  # telemetry and LRU order, off the request path
            users, items = pairs_of([queries[n] for n in prefetched])
            used = np.concatenate([hit[offsets[n] : offsets[n + 1]] for n in prefetched])
            self._reads.append((users, items, used))
        if unread:
            if not await self._read_cache([queries[n] for n in unread], version, dim, emb, hit, offsets, unread):
                failed.update(unread)
        error_pairs = sum(len(queries[n].candidates) for n in failed)
        self._count_fm("cache_error", error_pairs)
        hits = int(hit.sum())
        self._count_fm("cache_hit", hits)
        self._count_fm("cache_miss", len(hit) - hits - error_pairs)
        shares: list[float | None] = [
            float(hit[offsets[n] : offsets[n + 1]].mean()) if len(q.candidates) else 0.0 for n, q in enumerate(queries)
        ]
        return torch.from_numpy(emb), torch.from_numpy(hit), shares

    def _fill_misses(self, queries: list[RankQuery], present: torch.Tensor | None) -> None:
        """``reactive``: hand the batch's missed pairs (``present`` [P] False, :func:`pairs_of`
        order) to the FM workers; a failed read (every pair absent) asks for them all too."""
        if self._filler is None or present is None:
            return
        missed = ~present.numpy()
        if missed.any():
            users, items = pairs_of(queries)
            self._filler.fill(users[missed], items[missed])

    async def _read_cache(self, queries: list[RankQuery], version: str, dim: int, emb: np.ndarray, hit: np.ndarray,
                          offsets: np.ndarray, positions: list[int]) -> bool:  # fmt: skip
        """One cache read for the pairs of ``queries`` (at ``positions`` in the batch), written
        into ``emb``/``hit``; False (nothing written) when the breaker is open or the read fails."""
        if self._cache is None or self._cache_breaker.open:
            return False
        users, items = pairs_of(queries)
        pending = self._cache.get.remote(users, items, version, dim)
        read = await self._cache_breaker.read(pending, self._live.cache_timeout_s, self._live.cache_retry_s,
                                              "FM cache read (ranking without FM)")  # fmt: skip
        if read is None:  # overloaded, timed out or its replica died: rank without FM
            return False
        rows, present, _ = read
        start = 0
        for n in positions:
            size = offsets[n + 1] - offsets[n]
            emb[offsets[n] : offsets[n + 1]] = rows[start : start + size]
            hit[offsets[n] : offsets[n + 1]] = present[start : start + size]
            start += size
        return True

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self._live.signal_flush_s)
            try:
                self._flush()
            except Exception:  # a dead Predictor or cache must not stop the signals for good
                logger.exception("Ranker signal flush failed")

    def _flush(self) -> None:
        """Send the buffered signals, fire and forget (they are hints, not state)."""
        if self._observed and self._predictor is not None:
            observed, self._observed = self._observed, []
            self._predictor.observe_requests.remote(observed, self._observed_since)
        fm = self._stage.models.fm
        if self._reads and self._cache is not None and fm is not None:
            reads, self._reads = self._reads, []
            users, items, used = (np.concatenate(parts) for parts in zip(*reads))
            self._cache.record_reads.remote(users, items, fm.version, used)

    def _count_fm(self, source: str, pairs: int) -> None:
        if pairs > 0:  # Serve's Counter rejects increments of 0
            self._fm_pairs.inc(pairs, tags={"source": source})

    def info(self) -> dict[str, Any]:
        fm = self._stage.models.fm
        return {
            "ranker_version": self._stage.models.version,
            "fm_version": fm.version if fm is not None else None,
            "fm_mode": self._live.fm_mode,
            "value": self._stage.value.model_dump(),
            "rejected_config": self._rejected,  # None: the last live config is the one in force
        }
