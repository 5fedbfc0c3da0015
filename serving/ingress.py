"""The HTTP ingress: FastAPI routes on a Ray Serve deployment.

Routes:
    POST /recommend  RecommendRequest → RecommendResponse (titles attached here)
    GET  /healthz    200 once this replica has loaded (liveness)
    GET  /readyz     the retriever's index version and sizes (readiness: a round trip to it)
    GET  /docs, /openapi.json  FastAPI's generated documentation

Errors: FastAPI answers bad input with 422 (validation; its ``detail`` names the field) or 400
(unparseable body); ``serving.middleware`` adds 413 (body over the limit) and turns anything
unexpected into a logged 503. A retriever queue that is full (``max_queued_requests``) answers
503 with ``Retry-After`` so clients back off instead of piling on.

No ``from __future__ import annotations``: FastAPI reads the route annotations as classes
(with string annotations Serve's class-based routes turn the body into a query parameter).
"""

import time
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serving.metrics import http_metrics
from serving.middleware import DEFAULT_MAX_BODY_BYTES, BodySizeLimit, ErrorsAs503, RequestMetrics
from serving.retriever import Query, Recommendation
from serving.run_index import read_titles
from serving.schemas import (
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    RecommendedItem,
    RecommendRequest,
    RecommendResponse,
)

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
    503: {"model": ErrorResponse, "description": "Overloaded or internal error; retry later."},
}


@serve.deployment
@serve.ingress(app)
class Ingress:
    """Validates requests, asks the Retriever, attaches titles.

    Args:
        retriever: handle to the ``Retriever`` deployment.
        dataset_dir: the dataset folder whose ``items.parquet`` gives titles.
        model_version: the index version reported with every response.
        max_body_bytes: request bodies above this get 413.
    """

    def __init__(
        self,
        retriever: DeploymentHandle,
        dataset_dir: str,
        model_version: str,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        app.state.max_body_bytes = max_body_bytes  # read per request by BodySizeLimit
        self._retriever = retriever
        self._titles = read_titles(Path(dataset_dir))
        self._model_version = model_version
        self._metrics = http_metrics()

    @app.post("/recommend", response_model=RecommendResponse, responses=_ERRORS)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """Top-k items for a user, best first; unknown users get the most popular items."""
        start = time.perf_counter()
        query = Query(user_id=body.user_id, k=body.k, exclude_seen=body.exclude_seen)
        try:
            answer: Recommendation = await self._retriever.recommend.remote(query)
        except BackPressureError as err:
            raise HTTPException(
                status_code=503, detail="retriever overloaded; retry later", headers={"Retry-After": "1"}
            ) from err
        retrieved = time.perf_counter()
        if answer.fallback is not None:
            self._metrics.observe_fallback(answer.fallback)
        items = [
            RecommendedItem(item_id=item_id, title=self._titles.get(item_id), score=score)
            for item_id, score in zip(answer.item_ids, answer.scores)
        ]
        return RecommendResponse(
            user_id=body.user_id,
            items=items,
            fallback=answer.fallback,
            model_version=self._model_version,
            timings_ms={
                "retrieve": (retrieved - start) * 1e3,
                "search": answer.search_ms,
                "total": (time.perf_counter() - start) * 1e3,
            },
        )

    @app.get("/healthz", response_model=HealthResponse)
    def healthz(self) -> HealthResponse:
        """Liveness: this replica finished loading (it cannot answer before)."""
        return HealthResponse(status="ok")

    @app.get("/readyz", response_model=ReadyResponse, responses={503: _ERRORS[503]})
    async def readyz(self) -> ReadyResponse:
        """Readiness: the retriever answers, with the index version it serves."""
        try:
            info = await self._retriever.info.remote()
        except BackPressureError as err:
            raise HTTPException(status_code=503, detail="retriever overloaded; retry later") from err
        return ReadyResponse(status="ready", **info)
