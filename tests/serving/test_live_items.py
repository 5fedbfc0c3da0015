"""Items added and removed live (issue #29: "an item added live is retrievable by the next request").

On the session's tiny MFLI run (``tiny_mfli_run``, with its exported content encoder), a new item
is a copy of a popular trained item's content under a new ID. Its *matching user* is one whose
top 10 retrieval results include it once added, decided by an in-process copy of the served
index in the same state (``serving.live_items.users_served``), and preferably one whose top 10
already held the original (retrieval results are what /recommend returns here: the tiny MFLI
run has no ranker).

First in process (``RetrievalIndex`` + ``LiveCatalogue``, no Ray), then over HTTP on 2 Ingress
replicas: ``POST /items`` answers once both replicas applied the item, so the very next
/recommend of the matching user holds it, whichever replica answers; a removed item never comes
back (index and popularity fallback); an item survives an Ingress replica's and the board's
restart; bad bodies are 422; a run whose index cannot take items (two-tower, exact) is 409.

Port 8344 (serving's range 8340-8359), on the session's Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from ray import serve

from serving.app import APP_NAME, ServingSettings, serve_app
from training.data.catalogue_log import ItemChange
from serving.chaos import kill_replica, wait_replaced
from serving.client import event_from
from serving.live_items import LiveCatalogue, unsupported_reason, users_served
from serving.retriever import Query, RetrievalIndex
from serving.run_index import index_dir, load_content_encoder, read_meta, read_titles, resolve_dataset_dir
from serving.serve_env import shutdown_serve
from training.runs import RunDir
from tests.serving.toy_run import ToyRun

PORT = 8344
K = 10
UNKNOWN_USER = 10**12
REPEATS = 12  # answers in a row that must agree (2 replicas: both answer some of them)


# ---------------------------------------------------------------- helpers
def dataset_items(run: RunDir) -> pa.Table:
    path = index_dir(run.path)
    return pq.read_table(Path(resolve_dataset_dir(read_meta(path), path)) / "items.parquet")


def copy_of(items: pa.Table, template: int, new_id: int) -> ItemChange:
    """A new item with the content of ``template`` (title, genres, year) under ``new_id``."""
    row = items.filter(pc.equal(items.column("item_id"), template)).to_pylist()[0]
    return ItemChange(new_id, row["title"], tuple(row["genres"] or ()), row["year"])


def body(change: ItemChange) -> dict:
    return {"item_id": change.item_id, "title": change.title, "genres": list(change.genres), "year": change.year}


def probe(run: RunDir) -> tuple[RetrievalIndex, LiveCatalogue]:
    """An in-process copy of what an Ingress replica holds for the run."""
    path = index_dir(run.path)
    index = RetrievalIndex(path)
    encoder = load_content_encoder(path, index.meta)
    assert encoder is not None, "the tiny MFLI run exports a content encoder"
    return index, LiveCatalogue(index, encoder, read_titles(Path(resolve_dataset_dir(index.meta, path))))


def all_users(index: RetrievalIndex) -> list[int]:
    return index.seen.users.tolist()


def matching_user(index: RetrievalIndex, template: int, new_id: int) -> int:
    """A user served ``new_id`` in their top K (``index`` already holds it), preferring one whose
    top K held ``template`` (the item whose content it copies)."""
    served = users_served(index, new_id, all_users(index), K)
    assert served, f"no user gets item {new_id} (a copy of {template}) in their top {K}"
    liked = [u for u in served if template in index.search([Query(u, K + 1)])[0].item_ids]
    return (liked or served)[0]


def popular_items(index: RetrievalIndex, n: int) -> list[int]:
    return index.popularity.top(n)[0].tolist()


# ---------------------------------------------------------------- in process
def test_an_added_item_is_embedded_from_its_content_and_served_then_dropped(tiny_mfli_run: RunDir) -> None:
    index, catalogue = probe(tiny_mfli_run)
    mfli = index.backend.retriever
    items = dataset_items(tiny_mfli_run)
    template = popular_items(index, 1)[0]
    new_id = int(pc.max(items.column("item_id")).as_py()) + 1000
    change = copy_of(items, template, new_id)
    n_before = index.info()["num_items"]

    assert catalogue.apply([change]) == 1 and index.serves(new_id) and index.info()["num_items"] == n_before + 1
    # the content encoder is the model's own content path: the copy's semantic facet is the original's
    ids = torch.tensor([new_id, template])
    torch.testing.assert_close(mfli.facet_vectors("semantic", ids)[0], mfli.facet_vectors("semantic", ids)[1], atol=1e-5, rtol=1e-4)
    assert mfli.codes_of("semantic", ids)[0].tolist() == mfli.codes_of("semantic", ids)[1].tolist()
    assert catalogue.titles[new_id] == change.title and catalogue.added() == [new_id]
    user = matching_user(index, template, new_id)
    assert new_id in index.search([Query(user, K)])[0].item_ids
    assert catalogue.apply([change]) == 0  # the same change again: nothing to do

    assert catalogue.apply([ItemChange.removal(new_id), ItemChange.removal(template)]) == 2
    assert not index.serves(new_id) and not index.serves(template)
    assert users_served(index, new_id, all_users(index), K) == [] and users_served(index, template, all_users(index), K) == []
    (cold,) = index.search([Query(UNKNOWN_USER, K)])
    assert cold.fallback == "popularity" and template not in cold.item_ids  # gone from the fallback too
    assert catalogue.apply([ItemChange(template, "a content copy", (), None)]) == 0  # trained: never from content


def test_an_item_a_newer_run_trained_keeps_its_live_name(tiny_mfli_run: RunDir) -> None:
    """After a continued run trained an item added live, the replayed log no longer adds it from
    content, but the replica still names it; a dataset item's own title is never replaced."""
    index, catalogue = probe(tiny_mfli_run)
    learned, named = popular_items(index, 2)
    del catalogue.titles[learned]  # as for an item the dataset does not have
    own_title = catalogue.titles[named]
    assert catalogue.apply([ItemChange(learned, "Added live", (), None), ItemChange(named, "Renamed", (), None)]) == 0
    assert catalogue.titles[learned] == "Added live" and catalogue.titles[named] == own_title
    assert catalogue.added() == []


def test_a_snapshot_drops_items_it_no_longer_mentions(tiny_mfli_run: RunDir) -> None:
    index, catalogue = probe(tiny_mfli_run)
    items = dataset_items(tiny_mfli_run)
    a, b = (copy_of(items, t, 10**9 + n) for n, t in enumerate(popular_items(index, 2)))
    catalogue.apply([a, b])
    assert catalogue.replace([b]) == 1  # a left: removed here; b already applied
    assert not index.serves(a.item_id) and index.serves(b.item_id)


def test_indexes_that_cannot_take_items_say_why(tiny_mfli_run: RunDir, toy_run: ToyRun) -> None:
    path = index_dir(tiny_mfli_run.path)
    exact = RetrievalIndex(path, index="exact")
    assert "retriever_index: exact" in unsupported_reason(exact, load_content_encoder(path, exact.meta))
    two_tower = RetrievalIndex(toy_run.run_dir / "index")
    assert load_content_encoder(two_tower.index_path, two_tower.meta) is None
    assert "'two_tower' run" in unsupported_reason(two_tower, None)
    mfli = RetrievalIndex(path)
    assert "no exported content encoder" in unsupported_reason(mfli, None)
    assert unsupported_reason(mfli, load_content_encoder(path, mfli.meta)) is None


# ---------------------------------------------------------------- over HTTP, 2 Ingress replicas
@pytest.fixture(scope="module")
def app(ray_session, tiny_mfli_run: RunDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = ServingSettings(feedback_dir=str(tmp_path_factory.mktemp("feedback")))  # 2 Ingress replicas
    try:
        yield serve_app(tiny_mfli_run.path, port=PORT, settings=settings)
    finally:
        shutdown_serve()


@pytest.fixture(scope="module")
def client(app: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=app, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def shadow(tiny_mfli_run: RunDir) -> tuple[RetrievalIndex, LiveCatalogue]:
    """The in-process copy the HTTP tests keep in the app's state (every change applied to both)."""
    return probe(tiny_mfli_run)


def recommended(client: httpx.Client, user: int) -> list[int]:
    reply = client.post("/recommend", json={"user_id": user, "k": K})
    assert reply.status_code == 200, reply.text
    return [item["item_id"] for item in reply.json()["items"]]


def add(client: httpx.Client, shadow, tiny_mfli_run: RunDir, template: int, new_id: int) -> tuple[ItemChange, int]:
    """POST a copy of ``template``; returns it and its matching user (decided on the shadow)."""
    change = copy_of(dataset_items(tiny_mfli_run), template, new_id)
    reply = client.post("/items", json={"items": [body(change)]})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"accepted": 1, "replicas_applied": 2, "replicas": 2}
    shadow[1].apply([change])
    return change, matching_user(shadow[0], template, new_id)


def test_an_added_item_is_in_the_matching_users_next_recommendations_on_every_replica(
    client: httpx.Client, shadow, tiny_mfli_run: RunDir
) -> None:
    template = popular_items(shadow[0], 1)[0]
    change, user = add(client, shadow, tiny_mfli_run, template, 5_000_001)
    for _ in range(REPEATS):  # no waiting: the POST answered once both replicas had it
        reply = client.post("/recommend", json={"user_id": user, "k": K}).json()
        titles = {i["item_id"]: i["title"] for i in reply["items"]}
        assert change.item_id in titles and titles[change.item_id] == change.title, reply
    candidates = client.get(f"/users/{user}/candidates").json()
    assert change.item_id in [i["item_id"] for i in candidates["items"]]
    # its title is known to the history too, once the user clicks it
    reply = client.post("/recommend", json={"user_id": user, "k": K}).json()
    position = [i["item_id"] for i in reply["items"]].index(change.item_id)
    assert client.post("/feedback", json={"events": [event_from(reply, position, "click")]}).status_code == 200
    deadline = time.monotonic() + 10
    while (newest := client.get(f"/users/{user}/history", params={"limit": 1}).json()["items"][0])["item_id"] != change.item_id:
        assert time.monotonic() < deadline, "the click on the new item never reached the history"
        time.sleep(0.1)
    assert newest["title"] == change.title
    ready = client.get("/readyz").json()
    assert ready["index"] == "mfli" and ready["num_items"] == shadow[0].info()["num_items"]


def test_both_ingress_replicas_serve(client: httpx.Client) -> None:
    """The test above means something only if requests do reach 2 replicas."""
    ingress = serve.status().applications[APP_NAME].deployments["Ingress"]
    assert ingress.replica_states.get("RUNNING") == 2


def test_a_removed_item_never_comes_back(client: httpx.Client, shadow, tiny_mfli_run: RunDir) -> None:
    template = popular_items(shadow[0], 2)[1]
    change, user = add(client, shadow, tiny_mfli_run, template, 5_000_002)
    assert change.item_id in recommended(client, user)
    reply = client.delete(f"/items/{change.item_id}")
    assert reply.status_code == 200 and reply.json()["replicas_applied"] == 2, reply.text
    shadow[1].apply([ItemChange.removal(change.item_id)])
    popular = popular_items(shadow[0], 1)[0]  # a trained item, in the popularity fallback
    assert popular in recommended(client, UNKNOWN_USER)
    assert client.delete(f"/items/{popular}").status_code == 200
    shadow[1].apply([ItemChange.removal(popular)])
    for _ in range(REPEATS):
        assert change.item_id not in recommended(client, user)
        assert popular not in recommended(client, UNKNOWN_USER)
    assert change.item_id not in [i["item_id"] for i in client.get(f"/users/{user}/candidates").json()["items"]]
    assert client.delete(f"/items/{change.item_id}").status_code == 404
    missing = client.delete("/items/123456789")
    assert missing.status_code == 404 and "not in the served index" in missing.json()["detail"]


def test_a_trained_item_is_not_replaced_from_content(client: httpx.Client, shadow, tiny_mfli_run: RunDir) -> None:
    trained = popular_items(shadow[0], 5)[4]
    reply = client.post("/items", json={"items": [body(copy_of(dataset_items(tiny_mfli_run), trained, trained))]})
    assert reply.status_code == 409 and "trained catalogue" in reply.json()["detail"]


def test_added_items_survive_an_ingress_and_a_board_restart(client: httpx.Client, shadow, tiny_mfli_run: RunDir) -> None:
    template = popular_items(shadow[0], 3)[2]
    change, user = add(client, shadow, tiny_mfli_run, template, 5_000_003)
    wait_replaced(kill_replica("Ingress"))  # the new replica gets the item in its first snapshot
    wait_in_every_answer(client, user, change.item_id)
    wait_replaced(kill_replica("HistoryBoard"))  # the new board replays the catalogue log
    board = serve.get_deployment_handle("HistoryBoard", APP_NAME)
    assert change in board.items.remote().result()
    wait_in_every_answer(client, user, change.item_id)
    later, later_user = add_when_followed(client, shadow, tiny_mfli_run, popular_items(shadow[0], 4)[3], 5_000_004)
    assert later.item_id in recommended(client, later_user)


def wait_in_every_answer(client: httpx.Client, user: int, item: int, timeout_s: float = 30.0) -> None:
    """Until REPEATS answers in a row hold the item (a replica being replaced may answer 503)."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < REPEATS:
        assert time.monotonic() < deadline, f"item {item} not in every answer for user {user} within {timeout_s}s"
        reply = client.post("/recommend", json={"user_id": user, "k": K})
        ok = reply.status_code == 200 and item in [i["item_id"] for i in reply.json()["items"]]
        streak = streak + 1 if ok else 0
        time.sleep(0.05 if ok else 0.5)


def add_when_followed(client: httpx.Client, shadow, tiny_mfli_run: RunDir, template: int, new_id: int) -> tuple[ItemChange, int]:
    """:func:`add`, retried until both replicas follow the restarted board (they reconnect within ~1 s)."""
    change = copy_of(dataset_items(tiny_mfli_run), template, new_id)
    deadline = time.monotonic() + 30
    while True:
        reply = client.post("/items", json={"items": [body(change)]})
        assert reply.status_code == 200, reply.text
        if reply.json()["replicas_applied"] == reply.json()["replicas"] == 2:
            break
        assert time.monotonic() < deadline, reply.json()
        time.sleep(0.5)
    shadow[1].apply([change])
    return change, matching_user(shadow[0], template, new_id)


def _item(**fields) -> dict:
    return {"item_id": 7_000_001, "title": "A new film", "genres": ["Drama"], "year": 2001, **fields}


@pytest.mark.parametrize(
    ("payload", "where"),
    [
        ({"items": []}, "items"),
        ({"items": [_item(item_id="7000001")]}, "item_id"),
        ({"items": [_item(item_id=2**63)]}, "item_id"),
        ({"items": [_item(item_id=-1)]}, "item_id"),  # the index's padding ID
        ({"items": [_item(title="")]}, "title"),
        ({"items": [{k: v for k, v in _item().items() if k != "title"}]}, "title"),
        ({"items": [_item(genres="Drama")]}, "genres"),
        ({"items": [_item(genres=[""])]}, "genres"),
        ({"items": [_item(year=1995.0)]}, "year"),
        ({"items": [_item(year=99999)]}, "year"),
        ({"items": [_item(rating=5)]}, "rating"),
        ({"items": [_item(), _item()]}, "body"),  # one item_id twice
        ([_item()], "body"),  # a bare list, not {"items": [...]}
    ],
)
def test_bad_item_bodies_are_422_naming_the_field(client: httpx.Client, payload, where: str) -> None:
    reply = client.post("/items", json=payload)
    assert reply.status_code == 422, reply.text
    assert any(where in [str(part) for part in d["loc"]] and d["msg"] for d in reply.json()["detail"]), reply.json()


def test_a_bad_item_id_to_delete_is_422(client: httpx.Client) -> None:
    assert client.delete("/items/not-a-number").status_code == 422
    assert client.delete(f"/items/{2**63}").status_code == 422


def test_fuzz_items_routes_never_5xx(app: str) -> None:
    """~60 schemathesis cases, valid and invalid, against POST /items and DELETE /items/{id} of the
    MFLI app (after the tests that read its catalogue: a valid DELETE may remove any item)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(httpx.get(f"{app}/openapi.json").json()).include(path_regex="^/items")
    strategy = schema.as_strategy(GenerationMode.POSITIVE) | schema.as_strategy(GenerationMode.NEGATIVE)
    seen: set[int] = set()

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=app, timeout=30)
        seen.add(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)

    check()
    assert 200 in seen and 422 in seen


def test_a_two_tower_run_refuses_items_with_409(ray_session, toy_run: ToyRun, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Last in this module: it redeploys the app on the toy two-tower run (exact index, no encoder)."""
    url = serve_app(toy_run.run_dir, port=PORT, settings=ServingSettings(feedback_dir=str(tmp_path_factory.mktemp("fb"))))
    with httpx.Client(base_url=url, timeout=30) as c:
        reply = c.post("/items", json={"items": [_item()]})
        assert reply.status_code == 409, reply.text
        assert "no content encoder" in reply.json()["detail"] and "MFLI" in reply.json()["detail"]
        assert c.delete(f"/items/{int(toy_run.item_ids[0])}").status_code == 409
