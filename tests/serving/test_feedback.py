"""``POST /feedback`` over real HTTP: acknowledged events survive a killed sink, exactly once.

Port 8341 (serving's range 8340-8359), on the session's Ray. Compaction is set to once an hour,
so at the kill every acknowledged event is only in the write-ahead segments.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from serving.serve_env import shutdown_serve
from serving.app import APP_NAME, ServingSettings, serve_app
from serving.chaos import kill_replica
from serving.feedback import FeedbackSink
from serving.feedback_log import FeedbackEvent, count_by_event_id, read_feedback
from tests.waiting import wait_for
from tests.serving.toy_run import ToyRun

PORT = 8341


@pytest.fixture(scope="module")
def app(ray_session, toy_run: ToyRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log_dir = tmp_path_factory.mktemp("feedback")
    settings = ServingSettings(feedback_dir=str(log_dir), feedback_compact_every_s=3600)
    try:
        yield serve_app(toy_run.run_dir, port=PORT, settings=settings), log_dir
    finally:
        shutdown_serve()


def event(event_id: str, user_id: int = 5, item_id: int = 1007) -> dict:
    return {"event_id": event_id, "user_id": user_id, "item_id": item_id, "event": "click",
            "timestamp": 1_700_000_000, "request_id": "r1"}


def test_acked_events_survive_a_killed_sink_exactly_once(app: tuple[str, Path]) -> None:
    url, log_dir = app
    acked: list[str] = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for batch in range(4):
            events = [event(f"e{batch}-{i}", user_id=5 + i, item_id=1000 + 7 * i) for i in range(25)]
            reply = client.post("/feedback", json={"events": events})
            assert reply.status_code == 200, reply.text
            assert reply.json() == {"accepted": 25}
            acked += [e["event_id"] for e in events]
        # the client lost an ack and resends batch 0: same event ids
        assert client.post("/feedback", json={"events": [event(f"e0-{i}") for i in range(25)]}).status_code == 200
    assert read_feedback(log_dir).num_rows == 0  # all of it only in the WAL so far

    kill_replica("FeedbackSink")
    # Serve replaces the replica; its constructor compacts what the dead one acknowledged.
    table = wait_for(lambda: (t := read_feedback(log_dir)).num_rows and t)
    assert count_by_event_id(table) == {event_id: 1 for event_id in acked}
    with httpx.Client(base_url=url, timeout=30) as client:  # and the new replica takes writes
        assert wait_for(lambda: client.post("/feedback", json={"events": [event("after")]}).status_code == 200)


@pytest.mark.parametrize(
    "body",
    [
        {"events": []},
        {"events": [{**event("x"), "user_id": "5"}]},
        {"events": [{**event("x"), "event": "DROP TABLE"}]},
        {"events": [{k: v for k, v in event("x").items() if k != "event_id"}]},
        {"events": [{**event("x"), "event_id": ""}]},
        {"events": [{**event("x"), "timestamp": -1}]},
        {"events": [event(f"x{i}") for i in range(257)]},
        {"event": event("x")},
    ],
)
def test_bad_feedback_gets_4xx(app: tuple[str, Path], body: dict) -> None:
    reply = httpx.post(f"{app[0]}/feedback", json=body, timeout=30)
    assert 400 <= reply.status_code < 500, reply.text
    assert reply.json()["detail"]


def test_two_sink_replicas_share_the_log_and_log_each_event_once(app: tuple[str, Path], tmp_path: Path) -> None:
    """ServingSettings.feedback_replicas=2: both replicas acknowledge writes into one folder, a
    batch resent to the other replica is logged once, and both compact on shutdown."""
    sink = FeedbackSink.options(name="TwoSinks", num_replicas=2, ray_actor_options={"num_cpus": 0})
    handle = serve.run(sink.bind(str(tmp_path), None, compact_every_s=3600), name="two-sinks", route_prefix=None)
    batches = [[FeedbackEvent(f"t{b}-{i}", 5 + i, 1000 + i, "click", 1_700_000_000) for i in range(5)] for b in range(30)]
    replies = [handle.append.remote(batch) for batch in batches] + [handle.append.remote(batches[0])]  # a resend
    assert [r.result() for r in replies] == [5] * 31
    writers = {path.stem.split("-")[1] for path in (tmp_path / "wal").glob("segment-*.jsonl")}
    assert len(writers) == 2  # both replicas took writes
    serve.delete("two-sinks")  # each drains, then compacts in __del__
    assert count_by_event_id(read_feedback(tmp_path)) == {e.event_id: 1 for batch in batches for e in batch}


def test_graceful_shutdown_compacts_before_the_replica_exits(app: tuple[str, Path]) -> None:
    """Last in the module: it removes the app."""
    url, log_dir = app
    reply = httpx.post(f"{url}/feedback", json={"events": [event("graceful-1"), event("graceful-2")]}, timeout=30)
    assert reply.status_code == 200
    serve.delete(APP_NAME)  # drains, then calls FeedbackSink.__del__
    counts = count_by_event_id(read_feedback(log_dir))
    assert counts["graceful-1"] == counts["graceful-2"] == 1
    assert all(n == 1 for n in counts.values())
