"""The load generator's HTTP client against a real uvicorn server: statuses, bodies (sized and
chunked), Retry-After, kept-alive connections reused, a timeout that drops only its connection."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from lean_http import LeanClient  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    app = FastAPI()
    peers: set[tuple] = set()

    @app.post("/echo")
    async def echo(request: Request):
        peers.add(request.client)
        return {"got": await request.json()}

    @app.post("/shed")
    async def shed():
        return JSONResponse({"detail": "full"}, status_code=429, headers={"Retry-After": "2"})

    @app.post("/chunked")
    async def chunked():
        async def parts():
            for piece in (b'{"a": ', b"[1, 2, ", b"3]}"):
                yield piece

        return StreamingResponse(parts(), media_type="application/json")

    @app.post("/slow")
    async def slow():
        await asyncio.sleep(1.0)
        return {"late": True}

    port = _free_port()
    # a short keep-alive timeout, so that a test can see the server close an idle connection
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", peers
    srv.should_exit = True
    thread.join(5)


def test_answers_statuses_retry_after_and_chunked_bodies(server):
    url, _ = server

    async def go():
        async with LeanClient(url) as client:
            ok = await client.post("/echo", json.dumps({"x": 1}).encode(), timeout_s=5)
            parsed = await client.post_json("/echo", {"y": 2}, timeout_s=5)
            shed_json = await client.post_json("/shed", {}, timeout_s=5)
            shed = await client.post("/shed", b"{}", timeout_s=5)
            chunked = await client.post("/chunked", b"{}", timeout_s=5)
            return ok, shed, chunked, parsed, shed_json

    ok, shed, chunked, parsed, shed_json = asyncio.run(go())
    assert parsed == (200, {"got": {"y": 2}}, None)
    assert shed_json == (429, None, "2")  # only a 200's body is parsed
    assert ok[0] == 200 and json.loads(ok[1]) == {"got": {"x": 1}} and ok[2] is None
    assert shed[0] == 429 and shed[2] == "2" and json.loads(shed[1]) == {"detail": "full"}
    assert chunked[0] == 200 and json.loads(chunked[1]) == {"a": [1, 2, 3]}


def test_sequential_posts_reuse_one_connection_and_concurrent_ones_open_more(server):
    url, peers = server
    peers.clear()

    async def go():
        async with LeanClient(url) as client:
            for i in range(20):
                assert (await client.post("/echo", b"{}", timeout_s=5))[0] == 200
            sequential = set(peers)
            peers.clear()
            answers = await asyncio.gather(*(client.post("/echo", b"{}", timeout_s=5) for _ in range(8)))
            return sequential, answers

    sequential, answers = asyncio.run(go())
    assert len(sequential) == 1  # one kept-alive connection served all 20
    assert all(a[0] == 200 for a in answers) and len(peers) > 1


def test_a_timeout_raises_and_the_next_request_still_answers(server):
    url, _ = server

    async def go():
        async with LeanClient(url) as client:
            with pytest.raises(asyncio.TimeoutError):
                await client.post("/slow", b"{}", timeout_s=0.2)
            return await client.post("/echo", b"{}", timeout_s=5)

    assert asyncio.run(go())[0] == 200


def test_a_connection_the_server_closed_while_idle_is_not_reused(server):
    url, _ = server

    async def go():
        async with LeanClient(url) as client:
            assert (await client.post("/echo", b"{}", timeout_s=5))[0] == 200
            await asyncio.sleep(1.5)  # past uvicorn's keep-alive timeout: it closes the connection
            t0 = time.perf_counter()
            status = (await client.post("/echo", b"{}", timeout_s=5))[0]
            return status, time.perf_counter() - t0

    status, seconds = asyncio.run(go())
    assert status == 200 and seconds < 1.0  # not the 5 s timeout of a write into a closed socket
