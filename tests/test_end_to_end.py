"""The seams end to end: ml-100k Parquet → 2-worker sharded training → run folder → Serve → HTTP.

Uses the session's trained run (tests/conftest.py) so the expensive part happens once.
"""

from __future__ import annotations

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

PORT = 8331


@pytest.fixture(scope="module")
def served(tiny_run):
    from ray import serve

    from serving.app import serve_app

    url = serve_app(tiny_run.path, port=PORT)
    yield url
    serve.shutdown()


def test_recommend_returns_k_unseen_items_from_the_catalogue(served, tiny_run, ml100k_dir):
    seen = pq.read_table(tiny_run.index_dir / "seen.parquet")
    catalogue = set(pq.read_table(ml100k_dir / "items.parquet", columns=["item_id"]).column("item_id").to_pylist())
    with httpx.Client(base_url=served, timeout=30) as client:
        for user_id in (1, 7, 943):
            body = client.post("/recommend", json={"user_id": user_id, "k": 10}).raise_for_status().json()
            ids = [item["item_id"] for item in body["items"]]
            assert len(ids) == 10 and len(set(ids)) == 10
            assert set(ids) <= catalogue
            user_seen = set(seen.filter(pc.field("user_id") == user_id).column("item_id").to_pylist())
            assert not set(ids) & user_seen
            scores = [item["score"] for item in body["items"]]
            assert scores == sorted(scores, reverse=True)
            assert body["fallback"] is None
            assert body["model_version"].startswith("tiny/")
            assert all(item["title"] for item in body["items"])


def test_served_scores_match_offline_exact_search(served, tiny_run):
    """Serving and the eval harness call the same retriever on the same exported embeddings."""

    from training.eval.run_eval import load_test_set
    from training.retrieval.exact import ExactRetriever

    data = load_test_set(tiny_run)
    retriever = ExactRetriever.from_index_dir(tiny_run.index_dir)
    offline = retriever.search(data.user_emb[:1], 10, exclude=data.exclude[:1]).item_ids[0].tolist()
    user_id = int(data.user_ids[0])
    online = httpx.post(f"{served}/recommend", json={"user_id": user_id, "k": 10}, timeout=30).json()
    assert [item["item_id"] for item in online["items"]] == offline


def test_unknown_user_gets_flagged_popularity_fallback(served):
    body = httpx.post(f"{served}/recommend", json={"user_id": 2**62 + 5, "k": 5}, timeout=30).json()
    assert body["fallback"] == "popularity" and len(body["items"]) == 5


@pytest.mark.parametrize(
    "payload",
    [{"user_id": 1, "k": 0}, {"user_id": 1, "k": 1001}, {"user_id": "one", "k": 5}, {"k": 5}],
)
def test_bad_requests_get_422_with_a_message(served, payload):
    reply = httpx.post(f"{served}/recommend", json=payload, timeout=30)
    assert reply.status_code == 422
    assert reply.json()["detail"]


def test_malformed_json_is_a_4xx_not_a_500(served):
    reply = httpx.post(f"{served}/recommend", content=b"{not json", headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= reply.status_code < 500
