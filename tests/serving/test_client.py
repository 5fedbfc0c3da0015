"""serving.client.RecommendClient against a real HTTP server that answers from a script.

The server is Python's ``http.server`` on a loopback port in a thread: real sockets, real
headers, real dropped connections; each test scripts the statuses the server gives.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.client import RecommendClient, RequestFailed, RetryPolicy

OK = {"user_id": 1, "items": [], "model_version": "v1"}


class Script:
    """Answers to give, in order (the last one repeats), and the bodies received."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str], str]] = []
        self.bodies: list[dict] = []
        self.times: list[float] = []


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            script.bodies.append(body)
            script.times.append(time.monotonic())
            status, headers, text = script.answers[min(len(script.bodies) - 1, len(script.answers) - 1)]
            if status == 0:  # drop the connection without answering
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if status == -1:  # answer too late
                time.sleep(1.0)
                status = 200
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(text)))
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", script
    finally:
        httpd.shutdown()


def detail(text: str) -> str:
    return json.dumps({"detail": text})


def test_retries_shed_and_lost_replica_answers_honouring_retry_after(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [
        (429, {"Retry-After": "0.3"}, detail("retriever overloaded")),
        (503, {"Retry-After": "0"}, detail("ranker replica lost")),
        (500, {}, "Internal Server Error"),
        (200, {}, json.dumps(OK)),
    ]
    with RecommendClient(url, RetryPolicy(backoff_s=0.01), seed=0) as client:
        assert client.recommend(1, k=5) == OK
        assert client.last_attempts == 4
        assert client.stats.retried_statuses == {429: 1, 503: 1, 500: 1}
    assert script.times[1] - script.times[0] >= 0.3  # waited as told
    assert all(b == {"user_id": 1, "k": 5, "exclude_seen": True} for b in script.bodies)


def test_client_errors_are_not_retried(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(422, {}, detail("k: Input should be less than or equal to 1000"))]
    with RecommendClient(url) as client, pytest.raises(RequestFailed) as failed:
        client.recommend(1, k=5000)
    assert failed.value.status == 422 and failed.value.attempts == 1
    assert "less than or equal to 1000" in failed.value.detail
    assert len(script.bodies) == 1


def test_gives_up_after_max_attempts_with_the_last_status(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "0"}, detail("overloaded"))]
    with RecommendClient(url, RetryPolicy(max_attempts=3)) as client, pytest.raises(RequestFailed) as failed:
        client.recommend(1)
    assert (failed.value.status, failed.value.attempts) == (503, 3)
    assert len(script.bodies) == 3


def test_the_deadline_bounds_the_whole_call(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "5"}, detail("overloaded"))]
    policy = RetryPolicy(max_attempts=10, deadline_s=1.0, max_retry_after_s=5.0)
    start = time.monotonic()
    with RecommendClient(url, policy) as client, pytest.raises(RequestFailed):
        client.recommend(1)
    assert time.monotonic() - start < 1.5  # never sleeps past the deadline
    assert len(script.bodies) == 1


def test_dropped_connections_and_slow_answers_are_retried(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(0, {}, ""), (-1, {}, ""), (200, {}, json.dumps(OK))]
    policy = RetryPolicy(backoff_s=0.01, attempt_timeout_s=0.3)
    with RecommendClient(url, policy) as client:
        assert client.recommend(1) == OK
        assert client.last_attempts == 3
        assert client.stats.transport_errors == 2


def test_a_retried_feedback_batch_keeps_its_event_ids(server: tuple[str, Script]) -> None:
    url, script = server
    script.answers = [(503, {"Retry-After": "0"}, detail("feedback log overloaded")), (200, {}, json.dumps({"accepted": 2}))]
    events = [{"user_id": 1, "item_id": 2, "event": "click"}, {"user_id": 1, "item_id": 3, "event": "impression", "event_id": "mine"}]
    with RecommendClient(url) as client:
        assert client.feedback(events) == {"accepted": 2}
    first, second = ([e["event_id"] for e in b["events"]] for b in script.bodies)
    assert first == second and first[1] == "mine" and len(set(first)) == 2
