"""The HTTP ingress: FastAPI routes on a Ray Serve deployment.

Routes:
    POST /recommend  RecommendRequest → RecommendResponse (titles attached here)
    POST /feedback   FeedbackRequest → FeedbackResponse, 200 only once the events are durable
    GET  /healthz    200 once this replica has loaded (liveness)
    GET  /readyz     index, ranker and FM versions (readiness: a round trip to each stage)
    GET  /docs, /openapi.json  FastAPI's generated documentation

With a ranker (the run has one), /recommend asks the Retriever for ``num_candidates`` items and
the Ranker keeps the best k by the value model, so k may not exceed ``num_candidates`` (a 422
saying so: the Ranker scores that many candidates per request whatever k is, and a k past it
would otherwise return fewer items than asked or make the Ranker score up to 1000); without a
ranker it returns the Retriever's top k, k up to ``schemas.MAX_K``. A request's ``context`` goes
to the Ranker with its candidates (``RankQuery.context``).

Errors: FastAPI answers bad input with 422 (validation; its ``detail`` names the field) or 400
(unparseable body); ``serving.middleware`` adds 413 (body over the limit) and turns anything
unexpected into a logged 503 with ``Retry-After``; a downstream replica that dies with the
request in flight is a 503 naming the stage, with ``Retry-After: 1``. A downstream queue that is full (``max_queued_requests``) answers
with that deployment's backpressure status (429 by default) and ``Retry-After`` so clients back
off instead of piling on; the proxy does the same for the Ingress's own queue.

No ``from __future__ import annotations``: FastAPI reads the route annotations as classes
(with string annotations Serve's class-based routes turn the body into a query parameter).
"""

import time
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.feedback_log import FeedbackEvent
from serving.fm_prefetch import FMPrefetch
from serving.metrics import http_metrics
from serving.middleware import (
    DEFAULT_MAX_BODY_BYTES,
    BodySizeLimit,
    ErrorsAs503,
    RequestMetrics,
)
from serving.ranker import Ranked, RankQuery
from serving.retriever import Query, Recommendation
from serving.run_index import read_titles
from serving.schemas import (
    MAX_K,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    HealthResponse,
    ReadyResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)
from training.storage import local_path

app = FastAPI(
    title="rayrec",
    summary="Top-k recommendations from a rayrec run (two-tower retrieval on Ray Serve).",
    version="0.1.0",
)
app.add_middleware(BodySizeLimit)  # innermost of the three
app.add_middleware(ErrorsAs503)
app.add_middleware(RequestMetrics)  # outermost: sees the final status of everything


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each failing field, without echoing the input back.

    FastAPI's default handler echoes each bad value, and a value JSON cannot encode (``NaN``,
    which Python's parser accepts) made it fail, turning a client error into a server error;
    echoing also returns whatever the client sent, up to the body limit.
    """
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


_ERRORS = {
    400: {"model": ErrorResponse, "description": "Body is not parseable JSON."},
    413: {"model": ErrorResponse, "description": "Body over the size limit."},
    422: {"model": ErrorResponse, "description": "Body fails validation (the detail names the field)."},
    429: {"model": ErrorResponse, "description": "Overloaded: shed; retry after Retry-After seconds."},
    503: {"model": ErrorResponse, "description": "Overloaded or internal error; retry later."},
}
DEFAULT_RETRY_AFTER_S = 1


_REPLICA_LOST = (RayActorError, ActorUnavailableError)
"""A downstream replica died (or is unreachable) with this request in flight."""


def unavailable(stage: str) -> HTTPException:
    """The HTTP answer for a request lost with a dead replica: 503 and ``Retry-After: 1``.

    Serve replaces the replica (and routes new requests to the live ones meanwhile); the request
    is idempotent, so the client retries it (``serving.client.RecommendClient`` does).
    """
    return HTTPException(
        status_code=503, detail=f"{stage} replica lost while serving this request; retry", headers={"Retry-After": "1"}
    )


def too_large_k(max_k: int) -> RequestValidationError:
    """The 422 for a k past what this app ranks, in the shape of every other validation error."""
    return RequestValidationError([{
        "loc": ("body", "k"), "type": "less_than_equal",
        "msg": f"Input should be less than or equal to {max_k}: this app ranks {max_k} retrieved candidates "
               "per request (serving setting num_candidates)",
    }])  # fmt: skip


def shed(err: BackPressureError, stage: str) -> HTTPException:
    """The HTTP answer for a full downstream queue: its status (429/503) and ``Retry-After``."""
    retry_after = err.retry_after_s if err.retry_after_s is not None else DEFAULT_RETRY_AFTER_S
    return HTTPException(
        status_code=getattr(err, "status_code", 503) or 503,
        detail=f"{stage} overloaded; retry later",
        headers={"Retry-After": str(max(1, int(-(-retry_after // 1))))},
    )


@serve.deployment
@serve.ingress(app)
class Ingress:
    """Validates requests, asks the Retriever (and the Ranker), attaches titles, logs feedback.

    Args:
        retriever: handle to the ``Retriever`` deployment.
        dataset_dir: the dataset (absolute path or URI) whose ``items.parquet`` gives titles.
        model_version: the index version reported with every response.
        max_body_bytes: request bodies above this get 413.
        ranker: handle to the ``Ranker`` or None (retrieval-only run).
        feedback: handle to the ``FeedbackSink`` or None (then /feedback answers 503).
        num_candidates: items retrieved per request for the ranker to choose from; with a ranker,
            also the largest k a request may ask for.
        fm_cache: handle to the ``FMCache`` (None: no precompute); the user's FM rows are then
            read in parallel with retrieval (``serving.fm_prefetch``).
        fm_prefetch_timeout_s: the longest that read may delay a request after retrieval.
        fm_prefetch_retry_s: after a failed or slow read, skip prefetching this long.
    """

    def __init__(
        self,
        retriever: DeploymentHandle,
        dataset_dir: str,
        model_version: str,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        ranker: DeploymentHandle | None = None,
        feedback: DeploymentHandle | None = None,
        num_candidates: int = 50,
        fm_cache: DeploymentHandle | None = None,
        fm_prefetch_timeout_s: float = 0.25,
        fm_prefetch_retry_s: float = 1.0,
    ) -> None:
        app.state.max_body_bytes = max_body_bytes  # read per request by BodySizeLimit
        self._retriever = retriever
        self._ranker = ranker
        self._feedback = feedback
        self._num_candidates = num_candidates
        self._max_k = num_candidates if ranker is not None else MAX_K
        self._prefetch = FMPrefetch(fm_cache, fm_prefetch_timeout_s, fm_prefetch_retry_s) if fm_cache is not None and ranker is not None else None
        self._titles = read_titles(local_path(dataset_dir))  # a URI: this node's copy
        self._model_version = model_version
        self._metrics = http_metrics()

    @app.post("/recommend", response_model=RecommendResponse, responses=_ERRORS)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """Top-k items for a user, best first; unknown users get the most popular items."""
        start = time.perf_counter()
        if body.k > self._max_k:
            raise too_large_k(self._max_k)
        ranking = self._ranker is not None
        query = Query(user_id=body.user_id, k=self._num_candidates if ranking else body.k, exclude_seen=body.exclude_seen)
        fm_pending = self._prefetch.start(body.user_id) if self._prefetch is not None else None
        try:
            answer: Recommendation = await self._retriever.recommend.remote(query)
        except BackPressureError as err:
            raise shed(err, "retriever") from err
        except _REPLICA_LOST as err:
            raise unavailable("retriever") from err
        retrieved = time.perf_counter()
        if answer.fallback is not None:
            self._metrics.observe_fallback(answer.fallback)
        timings = {"retrieve": (retrieved - start) * 1e3, "search": answer.search_ms}
        item_ids, scores = answer.item_ids[: body.k], answer.scores[: body.k]
        fm_from_cache, ranker_version = None, None
        if ranking and answer.fallback is None:
            fm_rows = await self._prefetch.settle(body.user_id, fm_pending) if self._prefetch is not None else None
            try:
                ranked: Ranked = await self._ranker.rank.remote(
                    RankQuery(user_id=body.user_id, candidates=answer.item_ids, k=body.k, fm_rows=fm_rows,
                              context=body.context or {})  # fmt: skip
                )
            except BackPressureError as err:
                raise shed(err, "ranker") from err
            except _REPLICA_LOST as err:
                raise unavailable("ranker") from err
            item_ids, scores, fm_from_cache = ranked.item_ids, ranked.scores, ranked.fm_from_cache
            timings.update(rank=(time.perf_counter() - retrieved) * 1e3, fm=ranked.fm_ms, score=ranked.rank_ms)
            ranker_version = ranked.version
            if self._prefetch is not None:
                self._prefetch.observe_mode(ranked.fm_mode)
        items = [
            RecommendedItem(item_id=item_id, title=self._titles.get(item_id), score=score)
            for item_id, score in zip(item_ids, scores)
        ]
        timings["total"] = (time.perf_counter() - start) * 1e3
        return RecommendResponse(
            user_id=body.user_id,
            items=items,
            fallback=answer.fallback,
            model_version=self._model_version,
            index=answer.index,
            request_id=uuid.uuid4().hex,
            ranker_version=ranker_version,
            fm_from_cache=fm_from_cache,
            timings_ms=timings,
        )

    @app.post("/feedback", response_model=FeedbackResponse, responses=_ERRORS)
    async def feedback(self, body: FeedbackRequest) -> FeedbackResponse:
        """Log impressions/engagements; 200 means durable (resending an event_id is harmless)."""
        if self._feedback is None:
            raise HTTPException(status_code=503, detail="feedback logging is not configured")
        events = [FeedbackEvent(**e.model_dump()) for e in body.events]
        try:
            accepted: int = await self._feedback.append.remote(events)
        except BackPressureError as err:
            raise shed(err, "feedback log") from err
        except _REPLICA_LOST as err:
            raise unavailable("feedback log") from err
        return FeedbackResponse(accepted=accepted)

    @app.get("/healthz", response_model=HealthResponse)
    def healthz(self) -> HealthResponse:
        """Liveness: this replica finished loading (it cannot answer before)."""
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses={503: _ERRORS[503]})
    async def readyz(self) -> ReadyResponse:
        """Readiness: every stage answers, with the index, ranker and FM versions it serves."""
        try:
            info = await self._retriever.info.remote()
            if self._ranker is not None:
                ranker = await self._ranker.info.remote()
                info.update({k: ranker[k] for k in ("ranker_version", "fm_version", "fm_mode")})
        except BackPressureError as err:
            raise shed(err, "readiness check") from err
        return ReadyResponse(status="ready", **info)
