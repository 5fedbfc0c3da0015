"""BodySizeLimit and ErrorsAs503 on a tiny Starlette app, in-process (no Ray)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.middleware import BodySizeLimit, ErrorsAs503


async def echo_size(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("secret internals")


async def boom_after_start(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield b"partial"
        raise RuntimeError("mid-stream")

    return StreamingResponse(body())


@pytest.fixture
def client() -> TestClient:
    app = Starlette(
        routes=[
            Route("/echo", echo_size, methods=["POST"]),
            Route("/boom", boom),
            Route("/stream", boom_after_start),
        ]
    )
    app.add_middleware(BodySizeLimit)
    app.add_middleware(ErrorsAs503)
    app.state.max_body_bytes = 100
    return TestClient(app, raise_server_exceptions=False)


def test_bodies_up_to_the_limit_reach_the_app_intact(client: TestClient) -> None:
    assert client.post("/echo", content=b"x" * 100).json() == {"size": 100}
    assert client.post("/echo", content=iter([b"x" * 60, b"y" * 40])).json() == {"size": 100}


def test_bodies_over_the_limit_get_413_declared_or_chunked(client: TestClient) -> None:
    declared = client.post("/echo", content=b"x" * 101)
    assert declared.status_code == 413 and "100-byte limit" in declared.json()["detail"]
    chunked = client.post("/echo", content=iter([b"x" * 60, b"y" * 60]))  # no Content-Length
    assert chunked.status_code == 413


def test_bad_content_length_is_400(client: TestClient) -> None:
    response = client.post("/echo", content=b"x", headers={"content-length": "-1"})
    assert response.status_code == 400


def test_unexpected_errors_become_503_without_internals(client: TestClient) -> None:
    response = client.get("/boom")
    assert response.status_code == 503
    assert response.json() == {"detail": "internal error while serving; retry later"}
    assert "secret" not in response.text


def test_error_after_headers_keeps_the_sent_status(client: TestClient) -> None:
    response = client.get("/stream")
    assert response.status_code == 200 and response.content.startswith(b"partial")
