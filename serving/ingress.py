"""The HTTP ingress: FastAPI routes on the one Ray Serve deployment that answers requests.

Routes:
    POST /recommend  RecommendRequest → RecommendResponse (titles attached here)
    POST /feedback   FeedbackRequest → FeedbackResponse, 200 only once the events are durable
    POST /items      ItemsRequest → ItemsResponse: new items from their content, durable, then in
                     every replica's index (409 when the served index cannot take them)
    DELETE /items/{id}  drop an item from every replica's index (404: not served)
    GET  /healthz    200 once this replica has loaded (liveness)
    GET  /readyz     index, ranker and FM versions this replica serves (readiness)
    GET  /users/{id}/history, /users/{id}/candidates, /ui   the page and its reads (serving.ui)
    GET  /docs, /openapi.json  FastAPI's generated documentation

The request path is one deployment (2 replicas by default, one per core): each Ingress replica holds the run's retrieval index
(``serving.retriever.RetrievalIndex``) and, when the run has a ranker, the ranking stage
(``serving.ranker.RankingService``), and runs both in process on one batch of requests
(``serving.batching.QueueBatcher``: whatever queued while the previous batch ran). Why: on 2
cores a Serve hop costs milliseconds of CPU on each side, and the graph this replaced (Ingress →
Retriever → Ranker, plus an FM cache prefetch per request) spent more CPU on hops than on
retrieval and ranking (docs/benchmarks/serving.md has the A/B). The only call left on the path
is the ranking stage's one FM cache read per batch (``fm_mode`` cache); precompute (Predictor,
FMWorker, FMCache) stays off it.

With a ranker, /recommend retrieves ``num_candidates`` items and ranks them, keeping the best k
by the value model, so k may not exceed ``num_candidates`` (a 422 saying so: the ranker scores
that many candidates per request whatever k is); without a ranker it returns the retrieval's
top k, k up to ``schemas.MAX_K``. A request's ``context`` goes to the ranking stage with its
candidates (``RankQuery.context``). Users the model does not know get the popularity fallback
and skip ranking.

Errors: FastAPI answers bad input with 422 (validation; its ``detail`` names the field) or 400
(unparseable body); ``serving.middleware`` adds 413 (body over the limit) and turns anything
unexpected into a logged 503 with ``Retry-After``. Overload is answered before any of this: a
replica whose queue is full (``max_queued_requests``) answers the backpressure status (429 by
default) with ``Retry-After`` at once. A FeedbackSink replica that dies with the request in
flight is a 503 naming the stage, with ``Retry-After: 1``; a full FeedbackSink queue answers its
backpressure status.

Live histories: with a ``HistoryBoard`` (``serving.history_board``), each replica follows it in a
background task (a long poll) and folds acknowledged clicks and engagements into its
``LiveHistory`` (``serving.live_history``), which retrieval (exclusion, query), the ranker (its
history feature) and ``/users/{id}/history`` read in memory: the request path gains no remote call,
and a /feedback answered by one replica reaches the others one hop after its ack.

Live items: ``POST /items`` and ``DELETE /items/{id}`` go to the same board
(``HistoryBoard.publish_items``: the catalogue log first, fsync), which the same follower task
applies to this replica's index through its ``LiveCatalogue`` (``serving.live_items``: encode
from content, add to MFLI; or remove). The route answers once every replica following the
board has applied the change (``HistoryBoard.wait_applied``, at most ``apply_timeout_s``; the
answer counts them), so the next request finds it whichever replica takes it. What survives
what: a change answered 200 is in the catalogue log, so a restarted Ingress replica (a snapshot
from the board), a restarted board (it replays the log) and a redeployed app with the same
``feedback_dir`` all serve it; a lost log folder loses it.

Live settings (``user_config`` → ``reconfigure``): ``max_batch_size``, ``batch_wait_timeout_s``
and ``ranker`` (``serving.ranker.RankerLiveConfig``: value model, ``fm_mode``, cache timeouts).

No ``from __future__ import annotations``: FastAPI reads the route annotations as classes
(with string annotations Serve's class-based routes turn the body into a query parameter).
"""

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass

import torch
from fastapi import FastAPI, HTTPException, Path
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Histogram

from serving.batching import QueueBatcher
from serving.feedback_log import FeedbackEvent
from training.data.catalogue_log import ItemChange
from serving.history_board import BoardUpdate
from serving.http_errors import ERRORS, REPLICA_LOST, shed, too_large_k, unavailable, validation_error
from serving.live_history import DEFAULT_HISTORY_LEN, LiveHistory, RankerHistories
from serving.live_items import LiveCatalogue, unsupported_reason
from serving.metrics import http_metrics
from serving.middleware import (
    DEFAULT_MAX_BODY_BYTES,
    BodySizeLimit,
    ErrorsAs503,
    RequestMetrics,
)
from serving.ranker import Ranked, RankingService, RankQuery
from serving.ranking_models import resolve_factory
from serving.retriever import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE, Query, RetrievalIndex, Recommendation
from serving.run_index import IndexChoice, load_content_encoder, read_titles
from serving.schemas import (
    INT64_MAX,
    INT64_MIN,
    MAX_HISTORY,
    MAX_K,
    CandidatesResponse,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    HistoryResponse,
    ItemsRequest,
    ItemsResponse,
    ReadyResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)
from serving import ui
from training.storage import local_path

logger = logging.getLogger("ray.serve")

app = FastAPI(
    title="rayrec",
    summary="Top-k recommendations from a rayrec run (two-tower retrieval on Ray Serve).",
    version="0.1.0",
)
app.add_middleware(BodySizeLimit)  # innermost of the three
app.add_middleware(ErrorsAs503)
app.add_middleware(RequestMetrics)  # outermost: sees the final status of everything


app.add_exception_handler(RequestValidationError, validation_error)


@dataclass(frozen=True)
class _Job:
    """One /recommend request waiting for its batch."""

    query: Query
    k: int
    context: dict
    queued_at: float


@dataclass(frozen=True)
class _Answer:
    """A request's share of its batch: the retrieval answer, the ranking (None: not ranked) and
    the batch's timings."""

    retrieved: Recommendation
    ranked: Ranked | None
    timings: dict[str, float]


@serve.deployment
@serve.ingress(app)
class Ingress:
    """Validates requests, retrieves and ranks them in process, attaches titles, logs feedback.

    Args:
        index_path: the run's ``index/`` folder (an absolute path or a URI).
        dataset_dir: the dataset (absolute path or URI) whose ``items.parquet`` gives titles.
        model_version: the index version reported with every response.
        index: the search backend (``serving.retriever.RetrievalIndex``); ``auto``: the run's
            learned index, else exact.
        beam: overrides a learned index's saved beam width.
        models_run: the run whose ranker to serve (absolute path or URI); None: retrieval only.
        models_factory: ``"module:function"`` loading that run's ranker and FM.
        fm_cache: handle to the ``FMCache`` (None: no precompute; ``cache`` mode acts as ``off``).
        predictor: handle to the ``Predictor`` (None: no precompute signals).
        fm_workers: handle to the ``FMWorker`` pool (``fm_mode`` reactive fills the cache on a miss).
        feedback: handle to the ``FeedbackSink`` or None (then /feedback answers 503).
        num_candidates: items retrieved per request for the ranker to choose from; with a ranker,
            also the largest k a request may ask for.
        max_body_bytes: request bodies above this get 413.
        torch_threads: torch intra-op threads in this replica.
        react_to_misses: see ``PrecomputeSettings.react_to_misses``.
        history_board: handle to the ``HistoryBoard`` (None: histories frozen at export, and
            no live item changes).
        history_len: live items kept per user.
        apply_timeout_s: the longest ``POST /items`` waits for every replica to apply its items.
    """

    def __init__(
        self,
        index_path: str,
        dataset_dir: str,
        model_version: str,
        index: IndexChoice = "auto",
        beam: int | None = None,
        ttt: bool = False,
        models_run: str | None = None,
        models_factory: str | None = None,
        fm_cache: DeploymentHandle | None = None,
        predictor: DeploymentHandle | None = None,
        feedback: DeploymentHandle | None = None,
        num_candidates: int = 50,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        torch_threads: int = 1,
        react_to_misses: bool = True,
        history_board: DeploymentHandle | None = None,
        history_len: int = DEFAULT_HISTORY_LEN,
        fm_workers: DeploymentHandle | None = None,
        apply_timeout_s: float = 10.0,
    ) -> None:
        torch.set_num_threads(torch_threads)
        app.state.max_body_bytes = max_body_bytes  # read per request by BodySizeLimit
        self._live = LiveHistory(history_len) if history_board is not None else None
        self._index = RetrievalIndex(index_path, index=index, beam=beam, ttt=ttt, live=self._live)
        self._ranking: RankingService | None = None
        if models_run is not None and models_factory is not None:
            models = resolve_factory(models_factory)(models_run)
            if models is None:
                raise ValueError(f"{models_factory} found no ranker in {models_run}")
            scorer = models.scorer
            if self._live is not None and hasattr(scorer, "histories"):  # the ranker reads live items too
                window = int(getattr(scorer, "meta", {}).get("history_len", history_len))
                scorer.histories = RankerHistories(scorer.histories, self._live, window)
            self._ranking = RankingService(models, fm_cache, predictor, react_to_misses=react_to_misses, workers=fm_workers)
        self._feedback = feedback
        self._num_candidates = num_candidates
        self._max_k = num_candidates if self._ranking is not None else MAX_K
        self._batcher: QueueBatcher[_Job, _Answer] = QueueBatcher(self._search_and_rank, DEFAULT_MAX_BATCH_SIZE,
                                                                   DEFAULT_BATCH_WAIT_TIMEOUT_S)  # fmt: skip
        self._titles = read_titles(local_path(dataset_dir))  # a URI: this node's copy
        self._model_version = model_version
        self._metrics = http_metrics()
        self._board = history_board
        self._catalogue, self._no_catalogue = self._live_catalogue(history_board)
        self._apply_timeout_s = apply_timeout_s
        self._name = uuid.uuid4().hex[:12]  # this replica, as the board's follower
        self._follower = asyncio.get_event_loop().create_task(self._follow_board()) if history_board is not None else None
        self._batch_sizes = Histogram(
            "rayrec_retriever_batch_size",
            description="Requests per batched search, by the index that searched.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("index",),
        )
        self._batch_sizes.set_default_tags({"index": self._index.backend.name})
        logger.info("Ingress loaded %s: %s; ranker %s", index_path, self._index.info(),
                    self._ranking.version if self._ranking else None)  # fmt: skip

    def reconfigure(self, config: dict) -> None:
        """Live settings: ``max_batch_size``, ``batch_wait_timeout_s``, ``ranker`` (a
        ``RankerLiveConfig`` as a dict; a config the ranker cannot serve is rejected whole and
        reported by :meth:`info`, the one in force keeps serving)."""
        self._batcher.max_batch_size = int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        self._batcher.wait_s = float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_TIMEOUT_S))
        if self._ranking is not None:
            self._ranking.reconfigure(config.get("ranker") or {})

    def _live_catalogue(self, board: DeploymentHandle | None) -> tuple[LiveCatalogue | None, str | None]:
        """This replica's ``LiveCatalogue``, or None and why ``POST /items`` is refused."""
        if board is None:
            return None, "live item changes need the HistoryBoard (serving setting live_history: true) to reach every replica"
        encoder = load_content_encoder(self._index.index_path, self._index.meta)
        reason = unsupported_reason(self._index, encoder)
        if reason is not None:
            return None, reason
        return LiveCatalogue(self._index, encoder, self._titles), None

    async def _follow_board(self) -> None:
        """Fold the board's deltas into this replica's live histories and index, for as long as
        it lives.

        A long poll (``HistoryBoard.since`` answers as soon as there is news): a delta reaches
        this replica one hop after the sink published it. A failed call (the board restarting)
        is retried after a pause; the next answer after a restart is a snapshot. Each call says
        how far this replica has applied (``cursor``), which ``POST /items`` waits on.
        """
        assert self._board is not None and self._live is not None
        epoch, cursor = "", 0
        while True:
            try:
                update: BoardUpdate = await self._board.since.remote(epoch, cursor, self._name)
            except Exception as err:  # keep following: a dead board is replaced and rebuilt
                logger.warning("Ingress: history board unreachable (%s); retrying", err)
                await asyncio.sleep(1.0)
                continue
            histories, items = update.histories(), update.items()
            if update.snapshot:
                self._live.replace(histories)
            else:
                self._live.apply(histories)
            if self._catalogue is not None and (items or update.snapshot):
                try:  # encoding and the index edit: in a thread, the index's lock keeps searches out
                    await asyncio.to_thread(self._catalogue.replace if update.snapshot else self._catalogue.apply, items)
                except Exception:  # one bad change must not stop this replica following the board
                    logger.exception("Ingress: could not apply %d catalogue changes", len(items))
            epoch, cursor = update.epoch, update.cursor

    async def _search_and_rank(self, jobs: list[_Job]) -> list[_Answer]:
        """One batch: one search for every request (a worker thread), then one ranking pass
        over the personalised answers (the stage reads the FM cache once for the batch)."""
        start = time.perf_counter()
        self._batch_sizes.observe(len(jobs))
        answers = await asyncio.to_thread(self._index.search, [job.query for job in jobs])
        searched = time.perf_counter()
        timings = {"queue": 0.0, "retrieve": (searched - start) * 1e3, "search": answers[0].search_ms}
        ranked: list[Ranked | None] = [None] * len(jobs)
        personal = [n for n, answer in enumerate(answers) if answer.fallback is None]
        if self._ranking is not None and personal:
            results = await self._ranking.rank([
                RankQuery(user_id=jobs[n].query.user_id, candidates=answers[n].item_ids, k=jobs[n].k,
                          context=jobs[n].context)
                for n in personal
            ])  # fmt: skip
            for n, result in zip(personal, results):
                ranked[n] = result
            timings["rank"] = (time.perf_counter() - searched) * 1e3
            timings["fm"], timings["score"] = results[0].fm_ms, results[0].rank_ms
        return [
            _Answer(answer, rank, {**timings, "queue": (start - job.queued_at) * 1e3})
            for job, answer, rank in zip(jobs, answers, ranked)
        ]

    @app.post("/recommend", response_model=RecommendResponse, responses=ERRORS)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """Top-k items for a user, best first; unknown users get the most popular items."""
        start = time.perf_counter()
        if body.k > self._max_k:
            raise too_large_k(self._max_k)
        ranking = self._ranking is not None
        query = Query(user_id=body.user_id, k=self._num_candidates if ranking else body.k, exclude_seen=body.exclude_seen)
        done = await self._batcher.submit(_Job(query, body.k, body.context or {}, start))
        answer, ranked = done.retrieved, done.ranked
        if answer.fallback is not None:
            self._metrics.observe_fallback(answer.fallback)
        item_ids, scores = answer.item_ids[: body.k], answer.scores[: body.k]
        fm_from_cache, ranker_version, fm_version, candidates = None, None, None, len(item_ids)
        if ranked is not None:
            item_ids, scores, fm_from_cache, ranker_version = ranked.item_ids, ranked.scores, ranked.fm_from_cache, ranked.version
            fm_version, candidates = ranked.fm_version, len(answer.item_ids)
        items = [
            RecommendedItem(item_id=item_id, title=self._titles.get(item_id), score=score)
            for item_id, score in zip(item_ids, scores)
        ]
        timings = {**done.timings, "total": (time.perf_counter() - start) * 1e3}
        return RecommendResponse(
            user_id=body.user_id,
            items=items,
            fallback=answer.fallback,
            model_version=self._model_version,
            index=answer.index,
            request_id=uuid.uuid4().hex,
            ranker_version=ranker_version,
            fm_version=fm_version,
            candidates=candidates,
            fm_from_cache=fm_from_cache,
            timings_ms=timings,
        )

    @app.post("/feedback", response_model=FeedbackResponse, responses=ERRORS)
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        """Log impressions/engagements; 200 means durable (resending an event_id is harmless)."""
        if self._feedback is None:
            raise HTTPException(status_code=503, detail="feedback logging is not configured")
        events = [FeedbackEvent(**e.model_dump()) for e in body.events]
        try:
            accepted: int = await self._feedback.append.remote(events)
        except BackPressureError as err:
            raise shed(err, "feedback log") from err
        except REPLICA_LOST as err:
            raise unavailable("feedback log") from err
        return FeedbackResponse(accepted=accepted)

    @app.post("/items", response_model=ItemsResponse, responses={**ERRORS, 409: {
        "model": ErrorResponse, "description": "The served index cannot take items from content, or an item_id is "
        "one the run trained."}})  # fmt: skip
    async def add_items(self, body: ItemsRequest) -> ItemsResponse:
        """Add new items from their content to every replica's index; 200 once durable and applied
        (``replicas_applied`` of ``replicas``). Re-sending an item replaces it (same content: no change)."""
        catalogue = self._require_catalogue()
        trained = [item.item_id for item in body.items if catalogue.is_trained(item.item_id)]
        if trained:
            raise HTTPException(status_code=409, detail=f"items {trained[:5]} are in the run's trained catalogue: their "
                                "trained vectors are not replaced from content (DELETE removes an item)")  # fmt: skip
        changes = [ItemChange(i.item_id, i.title, tuple(i.genres), i.year) for i in body.items]
        return await self._publish_items(changes)

    @app.delete("/items/{item_id}", response_model=ItemsResponse, responses={
        404: {"model": ErrorResponse, "description": "An item the served index does not hold."},
        409: {"model": ErrorResponse, "description": "The served index cannot be edited live."}, 422: ERRORS[422]})  # fmt: skip
    async def remove_item(self, item_id: int = Path(ge=INT64_MIN, le=INT64_MAX)) -> ItemsResponse:
        """Drop an item from every replica's index and popularity fallback; 200 once durable and applied."""
        self._require_catalogue()
        if not self._index.serves(item_id):
            raise HTTPException(status_code=404, detail=f"item {item_id} is not in the served index")
        return await self._publish_items([ItemChange.removal(item_id)])

    def _require_catalogue(self) -> LiveCatalogue:
        if self._catalogue is None:
            raise HTTPException(status_code=409, detail=f"this app cannot change items live: {self._no_catalogue}")
        return self._catalogue

    async def _publish_items(self, changes: list[ItemChange]) -> ItemsResponse:
        """Durable on the board, then wait (bounded) until every following replica applied them."""
        assert self._board is not None
        try:
            cursor: int = await self._board.publish_items.remote(changes)
            applied, replicas = await self._board.wait_applied.remote(cursor, self._apply_timeout_s)
        except BackPressureError as err:
            raise shed(err, "history board") from err
        except REPLICA_LOST as err:
            raise unavailable("history board") from err
        return ItemsResponse(accepted=len(changes), replicas_applied=applied, replicas=replicas)

    @app.get("/healthz", response_model=HealthResponse)
    def healthz(self) -> HealthResponse:
        """Liveness: this replica finished loading (it cannot answer before)."""
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses={503: ERRORS[503]})
    async def readyz(self) -> ReadyResponse:
        """Readiness: the index, ranker and FM versions this replica serves."""
        info = self.info()
        return ReadyResponse(status="ready", **{k: v for k, v in info.items() if k in ReadyResponse.model_fields})

    @app.get("/users/{user_id}/history", response_model=HistoryResponse, responses={
        404: {"model": ErrorResponse, "description": "A user the run does not know."}, 422: ERRORS[422]})
    def history(self, user_id: int = Path(ge=INT64_MIN, le=INT64_MAX),
                limit: int = QueryParam(20, ge=1, le=MAX_HISTORY)) -> HistoryResponse:  # fmt: skip
        """The user's most recent items with titles, newest first (``serving.ui`` says from where)."""
        answer = ui.user_history(self._index, self._titles, user_id, limit)  # frozen + live
        if answer is None:
            raise HTTPException(status_code=404, detail=f"user {user_id} is unknown to this run (no embedding, no "
                                "history, no engagement since); /recommend answers them with the popularity fallback")  # fmt: skip
        return answer

    @app.get("/users/{user_id}/candidates", response_model=CandidatesResponse)
    async def candidates(self, user_id: int = Path(ge=INT64_MIN, le=INT64_MAX)) -> CandidatesResponse:
        """Retrieval's ``num_candidates`` candidates before ranking (what a ranker would score)."""
        return await asyncio.to_thread(ui.candidates, self._index, self._titles, user_id, self._num_candidates)

    @app.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    def ui_page(self) -> HTMLResponse:
        """The page (``serving.ui``); not in /openapi.json, which describes the JSON API."""
        return ui.page(ui.example_users(self._index))

    # ------------------------------------------------------------------ handle methods
    async def retrieve(self, query: Query) -> Recommendation:
        """Retrieval alone, unbatched (the Predictor asks it for users seen only in /feedback)."""
        return (await asyncio.to_thread(self._index.search, [query]))[0]

    async def rank(self, query: RankQuery) -> Ranked:
        """The ranking stage on given candidates, unbatched (tools and tests)."""
        if self._ranking is None:
            raise ValueError("this app serves no ranker")
        return (await self._ranking.rank([query]))[0]

    def info(self) -> dict:
        """Index, ranker and FM versions, the live ranker config and whether the last one sent
        was rejected, and this replica's process id (tests check a hot swap kept it)."""
        info = {**self._index.info(), "replica_pid": os.getpid()}
        if self._ranking is not None:
            info.update(self._ranking.info())
        return info
