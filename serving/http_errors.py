"""How the ingress answers what is not a recommendation: bad input (422 naming the field, never
echoing it), a full downstream queue (its 429/503 with ``Retry-After``) and a downstream replica
lost mid-request (503, ``Retry-After: 1``), plus the error responses the OpenAPI page lists.

Why its own module: the routes (``serving.ingress``) raise these in several places and the
answers must read the same everywhere; clients (``serving.client``) retry on exactly these.
"""

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from serving.schemas import ErrorResponse


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each failing field, without echoing the input back.

    FastAPI's default handler echoes each bad value, and a value JSON cannot encode (``NaN``,
    which Python's parser accepts) made it fail, turning a client error into a server error;
    echoing also returns whatever the client sent, up to the body limit.
    """
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


ERRORS = {
    400: {"model": ErrorResponse, "description": "Body is not parseable JSON."},
    413: {"model": ErrorResponse, "description": "Body over the size limit."},
    422: {"model": ErrorResponse, "description": "Body fails validation (the detail names the field)."},
    429: {"model": ErrorResponse, "description": "Overloaded: shed; retry after Retry-After seconds."},
    503: {"model": ErrorResponse, "description": "Overloaded or internal error; retry later."},
}
DEFAULT_RETRY_AFTER_S = 1


REPLICA_LOST = (RayActorError, ActorUnavailableError)
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
