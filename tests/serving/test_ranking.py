"""The ranker stage and speculative precompute over real HTTP (port 8342, the session's Ray).

The app is the toy two-tower run plus the stand-in ranker and FM (tests/serving/
stand_in_models.py) through ``models_factory``: the Ingress retrieves and ranks in process and
reads FMCache ← FMWorker ← Predictor once per batch; FeedbackSink → Predictor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from ray import serve

from serving.serve_env import shutdown_serve
from serving.app import APP_NAME, ServingSettings, deploy_declaratively
from serving.client import RecommendClient, RequestFailed
from serving.feedback_log import SESSION_START_EVENT
from serving.fm_cache import UserRows
from serving.precompute import PrecomputeSettings
from serving.ranker import RankerLiveConfig, RankingStage, RankQuery
from serving.retriever import Query
from tests.serving.stand_in_models import (
    CLICK_ONLY,
    FM_VERSION,
    RANKER_VERSION,
    WATCH_ONLY,
    load_stand_in,
)
from tests.serving.toy_run import UNKNOWN_USER, VERSION, ToyRun
from training.models.value import ValueConfig, ValueTerm

PORT = 8342
FACTORY = "tests.serving.stand_in_models:load_stand_in"
CANDIDATES = 30
REACT_TEST_INTERVAL_S = 10.0


def settings_for(tmp: str, **live: object) -> ServingSettings:
    return ServingSettings(
        feedback_dir=tmp,
        models_factory=FACTORY,
        num_candidates=CANDIDATES,
        min_replicas=1, max_replicas=1,
        ranker_live=RankerLiveConfig(**live),
        # react_to_misses here (explicitly, though it is the default now),
        # with a slow interval so that a hit within seconds of a miss proves the miss woke it
        precompute=PrecomputeSettings(interval_s=REACT_TEST_INTERVAL_S, candidates=CANDIDATES, react_to_misses=True),
    )


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("feedback"))


@pytest.fixture(scope="module")
def client(ray_session, toy_run: ToyRun, feedback_dir: str) -> Iterator[httpx.Client]:
    # Declarative, as `serve deploy` and a RayService do: user_config changes then apply in place.
    url = deploy_declaratively(toy_run.run_dir, settings_for(feedback_dir), port=PORT)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            yield c
    finally:
        shutdown_serve()


def recommend(client: httpx.Client, user: int, k: int = 10) -> dict:
    reply = client.post("/recommend", json={"user_id": user, "k": k})
    assert reply.status_code == 200, reply.text
    return reply.json()


def poll(check, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout_s}s")


def test_readyz_reports_index_ranker_and_fm_versions(client: httpx.Client) -> None:
    assert client.get("/readyz").json() == {
        "status": "ready", "model_version": VERSION, "num_items": 300, "num_users": 40,
        "index": "exact", "beam": None, "ranker_version": RANKER_VERSION, "fm_version": FM_VERSION, "fm_mode": "cache",
    }


def test_a_cache_miss_falls_back_then_precompute_makes_it_a_hit(client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[3])
    first = recommend(client, user)
    assert first["fm_from_cache"] == 0.0  # never seen: the missing-FM path, not a wait
    assert first["ranker_version"] == RANKER_VERSION and first["fallback"] is None
    candidates = toy_run.expected_top(user, CANDIDATES)
    ids = [i["item_id"] for i in first["items"]]
    assert len(ids) == 10 and set(ids) <= set(candidates)
    stage = RankingStage(load_stand_in(""))
    query = [RankQuery(user, candidates, 10)]
    assert ids == stage.rank(query, None, None)[0][0]  # the same ranking as in-process, FM missing

    # the miss woke the predictor (react_to_misses): a hit well before its 10 s interval
    hit = poll(lambda: (body := recommend(client, user))["fm_from_cache"] == 1.0 and body or None,
               timeout_s=0.8 * REACT_TEST_INTERVAL_S)
    fm, present = stage.compute_fm(query)
    assert [i["item_id"] for i in hit["items"]] == stage.rank(query, fm, present)[0][0]  # with FM
    cache = serve.get_deployment_handle("FMCache", APP_NAME)
    # the ranking stage read the candidates' rows with one FMCache.get per batch
    summary = poll(lambda: (s := cache.summary.remote().result())["hits"] >= CANDIDATES and s or None, timeout_s=10)
    assert summary["speculation_precision"] > 0 and summary["latest_version"] == FM_VERSION
    assert summary["lookups"] >= 2 * CANDIDATES and summary["user_reads"] == 0  # no per-request read-ahead
    # the FM ran off the request path in a SCHED_IDLE thread (PrecomputeSettings.worker_idle_class)
    assert serve.get_deployment_handle("FMWorker", APP_NAME).idle_threads.remote().result() >= 1


def test_the_ranking_stages_cache_read_and_rows_passed_by_the_caller(client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[5])
    candidates = toy_run.expected_top(user, CANDIDATES)
    served = poll(lambda: (body := recommend(client, user))["fm_from_cache"] == 1.0 and body or None)
    ranker = serve.get_deployment_handle("Ingress", APP_NAME)
    # the stage on given candidates (Ingress.rank): its own cache read, the same order as HTTP
    own = ranker.rank.remote(RankQuery(user, candidates, 10)).result()
    assert own.fm_from_cache == 1.0 and own.item_ids == [i["item_id"] for i in served["items"]]
    # rows passed by the caller (UserRows) are used as given; a failed read: rank without FM
    failed = ranker.rank.remote(RankQuery(user, candidates, 10, fm_rows=UserRows.failed(user))).result()
    without_fm = RankingStage(load_stand_in("")).rank([RankQuery(user, candidates, 10)], None, None)[0][0]
    assert failed.fm_from_cache == 0.0 and failed.item_ids == without_fm


def test_feedback_alone_makes_the_predictor_precompute_a_users_candidates(client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[7])  # not requested by any other test
    event = {"event_id": "fb-1", "user_id": user, "item_id": int(toy_run.item_ids[0]), "event": "click", "timestamp": 1}
    assert client.post("/feedback", json={"events": [event]}).status_code == 200
    cache = serve.get_deployment_handle("FMCache", APP_NAME)
    # a click changes the user's candidates (live history: the item is seen, the query moves), so
    # the ones to find precomputed are those retrieved once the click is live, not the run's own
    poll(lambda: True if client.get(f"/users/{user}/history").json()["live"] == 1 else None)
    ingress = serve.get_deployment_handle("Ingress", APP_NAME)
    candidates = ingress.retrieve.remote(Query(user_id=user, k=CANDIDATES)).result().item_ids
    users, items = np.full(CANDIDATES, user), np.asarray(candidates)
    poll(lambda: True if not cache.missing.remote(users, items, FM_VERSION).result().any() else None)
    assert recommend(client, user)["fm_from_cache"] == 1.0  # the very first request hits


def test_cold_users_skip_the_ranker(client: httpx.Client, toy_run: ToyRun) -> None:
    body = recommend(client, UNKNOWN_USER, k=5)
    assert body["fallback"] == "popularity" and body["fm_from_cache"] is None
    assert [i["item_id"] for i in body["items"]] == toy_run.popular[:5]


def test_k_above_the_ranked_candidates_is_a_422_naming_the_limit(client: httpx.Client, toy_run: ToyRun) -> None:
    """The Ranker orders num_candidates (here 30) retrieved items per request; a bigger k used to
    make it score max(k, 30), up to 1000, per request."""
    user = int(toy_run.user_ids[13])
    for k in (CANDIDATES + 1, 1000):
        reply = client.post("/recommend", json={"user_id": user, "k": k})
        assert reply.status_code == 422, (k, reply.text)
        (error,) = reply.json()["detail"]
        assert error["loc"] == ["body", "k"] and error["type"] == "less_than_equal"
        assert f"less than or equal to {CANDIDATES}" in error["msg"] and "num_candidates" in error["msg"]
    everything = recommend(client, user, k=CANDIDATES)
    assert sorted(i["item_id"] for i in everything["items"]) == sorted(toy_run.expected_top(user, CANDIDATES))
    assert len(recommend(client, UNKNOWN_USER, k=CANDIDATES)["items"]) == CANDIDATES  # the fallback, same limit


def test_context_reaches_the_ranker_and_bad_context_is_a_422(client: httpx.Client, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[17])
    context = {"surface": "home", "device": "ios", "hour": 21, "ratio": 0.5, "new_session": True}
    with RecommendClient(str(client.base_url)) as rc:
        body = rc.recommend(user, k=5, context=context)
        assert body["ranker_version"] == RANKER_VERSION and len(body["items"]) == 5
        assert {i["item_id"] for i in body["items"]} <= set(toy_run.expected_top(user, CANDIDATES))
        for bad in ({"nested": {"x": 1}}, {"bad key": 1}, {f"k{n}": n for n in range(17)}, {"long": "x" * 257}):
            with pytest.raises(RequestFailed) as failed:
                rc.recommend(user, context=bad)
            assert failed.value.status == 422 and failed.value.attempts == 1 and "context" in failed.value.detail
    # the ranking stage takes it with the candidates; no scorer reads context yet, so the order is the same
    ranker = serve.get_deployment_handle("Ingress", APP_NAME)
    candidates = toy_run.expected_top(user, CANDIDATES)
    no_fm = UserRows.failed(user)  # rank without FM both times: the cache fills in between
    plain = ranker.rank.remote(RankQuery(user, candidates, 10, fm_rows=no_fm)).result()
    with_context = ranker.rank.remote(RankQuery(user, candidates, 10, fm_rows=no_fm, context=context)).result()
    assert (with_context.item_ids, with_context.scores) == (plain.item_ids, plain.scores)


def test_a_value_config_the_ranker_cannot_serve_is_rejected_and_the_old_one_keeps_serving(
    client: httpx.Client, toy_run: ToyRun, feedback_dir: str
) -> None:
    """It used to be applied, and every request then failed with a 503."""
    ranker = serve.get_deployment_handle("Ingress", APP_NAME)
    before = ranker.info.remote().result()
    user = int(toy_run.user_ids[19])
    unknown = ValueConfig(terms=[ValueTerm(signal="nope")])
    no_mbd = ValueConfig(terms=[ValueTerm(signal="click", transform="pct")])  # the stand-in has no MBD
    try:
        for bad, match in ((unknown, "'nope' is not a ranker task"), (no_mbd, "'click' has no MBD statistics")):
            with pytest.raises(ValueError, match=match):
                deploy_declaratively(toy_run.run_dir, settings_for(feedback_dir, value=bad, fm_mode="off"), port=PORT)
            info = ranker.info.remote().result()
            assert match in info["rejected_config"]
            assert info["replica_pid"] == before["replica_pid"]  # not restarted
            assert (info["value"], info["fm_mode"]) == (CLICK_ONLY.model_dump(), "cache")  # all of it rejected
            for _ in range(3):
                reply = recommend(client, user)
                assert reply["ranker_version"] == RANKER_VERSION, reply  # the whole answer when it flakes
    finally:
        deploy_declaratively(toy_run.run_dir, settings_for(feedback_dir), port=PORT)
    assert ranker.info.remote().result()["rejected_config"] is None


def test_value_config_hot_swap_reorders_without_restart(client: httpx.Client, toy_run: ToyRun, feedback_dir: str) -> None:
    ranker = serve.get_deployment_handle("Ingress", APP_NAME)
    pid = ranker.info.remote().result()["replica_pid"]
    user = int(toy_run.user_ids[11])

    def deploy(**live: object) -> None:
        deploy_declaratively(toy_run.run_dir, settings_for(feedback_dir, **live), port=PORT)
        want = RankerLiveConfig(**live)
        value = (want.value or CLICK_ONLY).model_dump()

        def applied() -> bool | None:
            info = ranker.info.remote().result()
            return True if info["fm_mode"] == want.fm_mode and info["value"] == value else None

        poll(applied, timeout_s=30)

    try:
        deploy(value=CLICK_ONLY, fm_mode="off")
        by_click = [i["item_id"] for i in recommend(client, user, k=CANDIDATES)["items"]]
        deploy(value=WATCH_ONLY, fm_mode="off")
        cache = serve.get_deployment_handle("FMCache", APP_NAME)
        reads = cache.summary.remote().result()["lookups"]
        swapped = recommend(client, user, k=CANDIDATES)
        assert cache.summary.remote().result()["lookups"] == reads  # "off" reads no cache
        by_watch = [i["item_id"] for i in swapped["items"]]
        assert by_watch == by_click[::-1]  # the stand-in's tasks rank items in opposite orders
        assert swapped["fm_from_cache"] is None  # fm_mode "off" took effect too
        info = ranker.info.remote().result()
        assert info["replica_pid"] == pid and info["value"] == WATCH_ONLY.model_dump()
        deploy(value=CLICK_ONLY, fm_mode="sync")
        sync = recommend(client, user, k=5)
        assert sync["fm_from_cache"] is None and sync["timings_ms"]["fm"] > 0
    finally:
        deploy()
    assert client.get("/readyz").json()["fm_mode"] == "cache"


def test_reactive_mode_misses_a_first_request_and_hits_its_repeat(client: httpx.Client, toy_run: ToyRun, feedback_dir: str) -> None:
    """``fm_mode`` reactive (serving.reactive), with the Predictor paused so nothing is predicted:
    the first request ranks on the missing-FM path, its missed pairs are computed off the path
    into the cache, and the repeat reads them."""
    user = int(toy_run.user_ids[21])  # not requested by any other test
    ranker = serve.get_deployment_handle("Ingress", APP_NAME)
    predictor = serve.get_deployment_handle("Predictor", APP_NAME)
    predictor.set_paused.remote(True).result()
    tracked = predictor.summary.remote().result()["tracked_users"]
    try:
        deploy_declaratively(toy_run.run_dir, settings_for(feedback_dir, fm_mode="reactive"), port=PORT)
        poll(lambda: True if ranker.info.remote().result()["fm_mode"] == "reactive" else None, timeout_s=30)
        first = recommend(client, user)
        assert first["fm_from_cache"] == 0.0  # a first request: nothing computed before it
        repeat = poll(lambda: (body := recommend(client, user))["fm_from_cache"] == 1.0 and body or None, timeout_s=20)
        candidates = toy_run.expected_top(user, CANDIDATES)
        stage = RankingStage(load_stand_in(""))
        query = [RankQuery(user, candidates, 10)]
        fm, present = stage.compute_fm(query)
        assert [i["item_id"] for i in repeat["items"]] == stage.rank(query, fm, present)[0][0]  # ranked with the FM
        assert predictor.summary.remote().result()["tracked_users"] == tracked  # the Predictor was told nothing
    finally:
        deploy_declaratively(toy_run.run_dir, settings_for(feedback_dir), port=PORT)
        predictor.set_paused.remote(False).result()
    poll(lambda: True if ranker.info.remote().result()["fm_mode"] == "cache" else None, timeout_s=30)


def test_a_session_start_event_precomputes_before_the_first_request(client: httpx.Client, toy_run: ToyRun) -> None:
    """A ``session_start`` /feedback event (an app open) wakes the Predictor for a user it has never
    seen: their candidates are in the cache before their first /recommend, which then hits."""
    user = int(toy_run.user_ids[23])  # not requested by any other test
    event = {"event_id": "start-1", "user_id": user, "item_id": 0, "event": SESSION_START_EVENT, "timestamp": 1}
    assert client.post("/feedback", json={"events": [event]}).status_code == 200
    ingress = serve.get_deployment_handle("Ingress", APP_NAME)
    candidates = ingress.retrieve.remote(Query(user_id=user, k=CANDIDATES)).result().item_ids
    users, items = np.full(CANDIDATES, user), np.asarray(candidates)
    cache = serve.get_deployment_handle("FMCache", APP_NAME)
    # at once, not at the Predictor's next (10 s) interval
    poll(lambda: True if not cache.missing.remote(users, items, FM_VERSION).result().any() else None,
         timeout_s=0.8 * REACT_TEST_INTERVAL_S)
    assert recommend(client, user)["fm_from_cache"] == 1.0  # the session's first request hits
    assert client.get(f"/users/{user}/history").json()["live"] == 0  # a session start is no engagement
