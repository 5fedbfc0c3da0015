"""Fresh recommendations over real HTTP, on 2 Ingress replicas: an acknowledged click reaches
the user's history and leaves their next recommendations, whichever replica answers; /feedback
takes the fields counterfactual evaluation needs and rejects bad ones with a 422.

Port 8343 (serving's range 8340-8359), on the session's Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from ray import serve

from serving.app import APP_NAME, ServingSettings, serve_app
from serving.chaos import kill_replica, wait_replaced
from serving.client import event_from
from serving.feedback import FeedbackSink
from serving.feedback_log import read_feedback
from serving.serve_env import shutdown_serve
from tests.serving.toy_run import UNKNOWN_USER, ToyRun

PORT = 8343
FRESH_WITHIN_S = 5.0  # issue #29: an acknowledged event in the next recommendation within 5 s


@pytest.fixture(scope="module")
def app(ray_session, toy_run: ToyRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    log_dir = tmp_path_factory.mktemp("feedback")
    settings = ServingSettings(feedback_dir=str(log_dir), feedback_compact_every_s=3600)  # 2 Ingress replicas
    try:
        yield serve_app(toy_run.run_dir, port=PORT, settings=settings), log_dir
    finally:
        shutdown_serve()


@pytest.fixture(scope="module")
def client(app: tuple[str, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app[0], timeout=30) as c:
        yield c


def recommend(client: httpx.Client, user: int, k: int = 10) -> dict:
    reply = client.post("/recommend", json={"user_id": user, "k": k})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_an_acknowledged_click_is_in_history_and_no_longer_recommended_on_every_replica(client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[7])
    answer = recommend(client, user)
    clicked = answer["items"][2]["item_id"]
    ack = client.post("/feedback", json={"events": [event_from(answer, position=2, event="click")]})
    assert ack.status_code == 200 and ack.json() == {"accepted": 1}
    acked = time.monotonic()
    # every answer after the ack has to reflect it once fresh: 10 in a row, on whichever replica
    fresh_streak = 0
    while fresh_streak < 10:
        assert time.monotonic() - acked < FRESH_WITHIN_S + 5, "the click never showed on every replica"
        items = [i["item_id"] for i in recommend(client, user)["items"]]
        history = client.get(f"/users/{user}/history").json()
        reflected = clicked not in items and history["items"][0]["item_id"] == clicked and history["live"] == 1
        fresh_streak = fresh_streak + 1 if reflected else 0
        if not reflected:
            time.sleep(0.05)
    assert time.monotonic() - acked < FRESH_WITHIN_S + 2
    assert history["total"] == len(toy_run.seen[user]) + 1


def test_both_ingress_replicas_serve(client: httpx.Client) -> None:
    """The test above means something only if requests do reach 2 replicas."""
    ingress = serve.status().applications[APP_NAME].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2


def test_an_impression_changes_nothing(client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[9])
    answer = recommend(client, user)
    assert client.post("/feedback", json={"events": [event_from(answer, 0, "impression")]}).status_code == 200
    time.sleep(1.5)
    assert [i["item_id"] for i in recommend(client, user)["items"]] == [i["item_id"] for i in answer["items"]]
    assert client.get(f"/users/{user}/history").json()["live"] == 0


def test_a_new_user_with_a_click_gets_recommendations_from_it(client: httpx.Client, toy_run: ToyRun) -> None:
    stranger = UNKNOWN_USER + 11
    assert client.get(f"/users/{stranger}/history").status_code == 404
    first = recommend(client, stranger, k=5)
    assert first["fallback"] == "popularity"
    item = first["items"][0]["item_id"]
    assert client.post("/feedback", json={"events": [event_from(first, 0, "click")]}).status_code == 200
    deadline = time.monotonic() + FRESH_WITHIN_S + 5
    streak = 0
    while streak < 6:
        assert time.monotonic() < deadline
        answer = recommend(client, stranger, k=5)
        ok = answer["fallback"] == "live_history" and item not in [i["item_id"] for i in answer["items"]]
        streak = streak + 1 if ok else 0
        time.sleep(0.05)
    history = client.get(f"/users/{stranger}/history").json()
    assert [i["item_id"] for i in history["items"]] == [item] and history["live"] == history["total"] == 1


def wait_reflected(client: httpx.Client, user: int, item: int, timeout_s: float = FRESH_WITHIN_S + 5) -> None:
    """Until 6 answers in a row (so both replicas, most likely) show the item newest and not recommended."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < 6:
        assert time.monotonic() < deadline, f"item {item} not reflected for user {user} within {timeout_s}s"
        items = [i["item_id"] for i in recommend(client, user)["items"]]
        history = client.get(f"/users/{user}/history").json()["items"]
        streak = streak + 1 if item not in items and history and history[0]["item_id"] == item else 0
        time.sleep(0.05)


def test_a_killed_board_is_rebuilt_from_the_log_and_new_clicks_still_arrive(client: httpx.Client, toy_run: ToyRun) -> None:
    """The board holds the only fan-out state; its replacement rebuilds it from the feedback log
    (WAL included: compaction is hourly here) and the replicas resync from a snapshot."""
    before, after = int(toy_run.user_ids[15]), int(toy_run.user_ids[16])
    answer = recommend(client, before)
    assert client.post("/feedback", json={"events": [event_from(answer, 1, "click")]}).status_code == 200
    wait_reflected(client, before, answer["items"][1]["item_id"])
    wait_replaced(kill_replica("HistoryBoard"))
    board = serve.get_deployment_handle("HistoryBoard", APP_NAME)
    assert answer["items"][1]["item_id"] in board.history.remote(before).result()  # rebuilt from the log
    wait_reflected(client, before, answer["items"][1]["item_id"])  # still reflected after the resync
    second = recommend(client, after)
    assert client.post("/feedback", json={"events": [event_from(second, 0, "engagement")]}).status_code == 200
    wait_reflected(client, after, second["items"][0]["item_id"], timeout_s=30)  # the new board fans out too


def test_serving_fields_reach_the_log(app: tuple[str, Path], client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[11])
    answer = recommend(client, user, k=8)
    assert answer["candidates"] == 8  # retrieval only: the list is retrieval's own top 8
    event = event_from(answer, position=5, event="click")
    assert client.post("/feedback", json={"events": [event]}).status_code == 200
    serve.get_deployment_handle("FeedbackSink", APP_NAME).compact.remote().result()
    rows = {r["event_id"]: r for r in read_feedback(app[1]).to_pylist()}
    row = rows[event["event_id"]]
    assert (row["position"], row["candidates"], row["model_version"], row["request_id"]) == (
        5, 8, answer["model_version"], answer["request_id"])  # fmt: skip
    assert row["ranker_version"] is None and row["fm_version"] is None  # retrieval-only app


def _event(**fields) -> dict:
    return {"event_id": "bad", "user_id": 5, "item_id": 1007, "event": "click", "timestamp": 1_700_000_000, **fields}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"position": -1}, "position"),
        ({"position": 1000}, "position"),
        ({"position": "3"}, "position"),
        ({"position": 1.5}, "position"),
        ({"candidates": 0}, "candidates"),
        ({"candidates": 2**31}, "candidates"),
        ({"model_version": ""}, "model_version"),
        ({"model_version": "x" * 129}, "model_version"),
        ({"ranker_version": 3}, "ranker_version"),
        ({"fm_version": ""}, "fm_version"),
    ],
)
def test_bad_serving_fields_are_422_naming_the_field(client: httpx.Client, fields: dict, field: str) -> None:
    reply = client.post("/feedback", json={"events": [_event(**fields)]})
    assert reply.status_code == 422, reply.text
    assert any(d["loc"][-1] == field and d["msg"] for d in reply.json()["detail"])
