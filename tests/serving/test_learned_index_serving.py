"""Serving the learned indexes: an MFLI or HSNN run's Ingress retrieves with the index it trained.

The session's tiny runs (``tiny_mfli_run``, ``tiny_hsnn_run`` in tests/conftest.py) are served
in-process (``RetrievalIndex``, no Ray) and compared with the learned index's own ``search``
read straight from the run folder, so a serving path that quietly fell back to exact search
would fail; then one HTTP round trip through Serve for the MFLI run on port 8361 (this module's
ports: 8360-8369).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray import serve

from serving.serve_env import shutdown_serve
from serving.app import ServingSettings, serve_app
from serving.retriever import Query, Recommendation, RetrievalIndex
from serving.run_index import index_dir
from training.index.hsnn_index import HSNNIndex
from training.index.mfli_index import MFLIIndex
from training.retrieval import PAD_ITEM_ID, SearchResult, read_embedding_table
from training.runs import RunDir

PORT = 8361
NUM_ITEMS = 1682  # ml-100k
K = 10
UNKNOWN_USER = 10**12


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small searches on a shared 2-core machine run faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seen_items(run: RunDir, user_id: int) -> torch.Tensor:
    """The user's train + valid items, read from ``index/seen.parquet`` (not through serving)."""
    table = pq.read_table(run.index_dir / "seen.parquet")
    rows = table.filter(pc.equal(table.column("user_id"), user_id))
    return torch.from_numpy(rows.column("item_id").to_numpy().astype(np.int64))


def assert_same_answer(answer: Recommendation, expected: SearchResult) -> None:
    """Serving's answer for one user is row 0 of the learned index's own search, k real items."""
    assert answer.fallback is None
    assert answer.item_ids == expected.item_ids[0].tolist()
    assert len(answer.item_ids) == K and PAD_ITEM_ID not in answer.item_ids
    torch.testing.assert_close(torch.tensor(answer.scores), expected.scores[0])
    assert answer.items_scored == expected.stats["items_scored"]


# ---------------------------------------------------------------- MFLI, in-process
@pytest.fixture(scope="module")
def mfli_served(tiny_mfli_run: RunDir) -> RetrievalIndex:
    return RetrievalIndex(index_dir(tiny_mfli_run.path))


def test_mfli_run_serves_its_learned_index_with_sub_linear_work(tiny_mfli_run: RunDir, mfli_served: RetrievalIndex) -> None:
    own = MFLIIndex.load(tiny_mfli_run.mfli_index_dir)  # beam and depth from its index.json
    assert mfli_served.info() == {
        "model_version": "tiny-mfli/epoch-0001", "num_items": NUM_ITEMS, "num_users": 943,
        "index": "mfli", "beam": own.beam,
    }
    user_ids, user_emb = read_embedding_table(tiny_mfli_run.index_dir / "users.parquet", "user_id")
    user, emb = int(user_ids[0]), user_emb[:1]  # [1, D] concatenated facets
    (answer,) = mfli_served.search([Query(user, K, exclude_seen=False)])
    expected = own.search(emb, K, exclude=[torch.empty(0, dtype=torch.int64)])
    assert answer.index == "mfli"
    assert_same_answer(answer, expected)
    assert answer.items_scored < NUM_ITEMS  # the beam reached part of the catalogue, not all of it

    seen = seen_items(tiny_mfli_run, user)
    (answer,) = mfli_served.search([Query(user, K)])
    assert_same_answer(answer, own.search(emb, K, exclude=[seen]))
    assert not set(answer.item_ids) & set(seen.tolist())


def test_mfli_run_unknown_users_exact_override_and_beam_override(tiny_mfli_run: RunDir, mfli_served: RetrievalIndex) -> None:
    path = index_dir(tiny_mfli_run.path)
    user = int(read_embedding_table(path / "users.parquet", "user_id")[0][0])
    known, cold = mfli_served.search([Query(user, K), Query(UNKNOWN_USER, K)])
    assert (known.index, cold.index, cold.fallback) == ("mfli", None, "popularity")
    assert len(cold.item_ids) == K

    exact = RetrievalIndex(path, index="exact")
    (answer,) = exact.search([Query(user, K)])
    assert (exact.info()["index"], exact.info()["beam"]) == ("exact", None)
    assert answer.index == "exact" and answer.items_scored == NUM_ITEMS

    wide = RetrievalIndex(path, beam=16)
    (wide_answer,) = wide.search([Query(user, K)])
    assert wide.info()["beam"] == 16 and wide_answer.items_scored > known.items_scored
    with pytest.raises(ValueError, match="index 'hsnn' asked for, but the run trained 'mfli'"):
        RetrievalIndex(path, index="hsnn")


# ---------------------------------------------------------------- HSNN, in-process
def test_hsnn_run_descends_its_tree_with_the_users_packs(tiny_hsnn_run: RunDir) -> None:
    path = index_dir(tiny_hsnn_run.path)
    served = RetrievalIndex(path)
    own = HSNNIndex.load(path / "hsnn")  # beam from hsnn.json
    info = served.info()
    assert (info["index"], info["beam"], info["num_items"], info["num_users"]) == ("hsnn", own.beam, NUM_ITEMS, 943)
    users = torch.load(path / "hsnn" / "users.pt")
    user, pack = int(users["user_ids"][0]), users["packs"][:1]  # [1, D + T]: user vector + history rows
    (answer,) = served.search([Query(user, K, exclude_seen=False)])
    assert answer.index == "hsnn"
    assert_same_answer(answer, own.search(pack, K, exclude=[torch.empty(0, dtype=torch.int64)]))
    assert answer.items_scored < NUM_ITEMS

    seen = seen_items(tiny_hsnn_run, user)
    (answer,) = served.search([Query(user, K)])
    assert_same_answer(answer, own.search(pack, K, exclude=[seen]))
    assert not set(answer.item_ids) & set(seen.tolist())
    (cold,) = served.search([Query(UNKNOWN_USER, K)])
    assert cold.fallback == "popularity" and cold.index is None
    with pytest.raises(ValueError, match="index 'mfli' asked for, but the run trained 'hsnn'"):
        RetrievalIndex(path, index="mfli")


def test_hsnn_test_time_training_is_served_behind_a_flag_and_refused_elsewhere(tiny_hsnn_run: RunDir,
                                                                           tiny_mfli_run: RunDir) -> None:  # fmt: skip
    from serving.app import build_app
    from training.models.hsnn_ttt import TTTConfig, TTTPool, TTTRetriever

    path = index_dir(tiny_hsnn_run.path)
    saved = json.loads((path / "hsnn" / "hsnn.json").read_text())["ttt"]  # the run's ttt settings, exported
    assert saved == TTTConfig(**(yaml.safe_load(tiny_hsnn_run.config_path.read_text()).get("ttt") or {})).model_dump()
    served = RetrievalIndex(path, ttt=True)
    assert isinstance(served.backend.retriever, TTTRetriever)
    own = HSNNIndex.load(path / "hsnn")
    users = torch.load(path / "hsnn" / "users.pt")
    user, pack = int(users["user_ids"][3]), users["packs"][3:4]
    seen = seen_items(tiny_hsnn_run, user)
    (answer,) = served.search([Query(user, K)])
    expected = TTTRetriever(own, TTTPool.load(path / "hsnn"), TTTConfig(**saved)).search(pack, K, exclude=[seen])
    assert answer.item_ids == expected.item_ids[0].tolist() and len(answer.item_ids) == K
    assert not set(answer.item_ids) & set(seen.tolist())
    assert served.backend.retriever.seconds > 0  # it fine-tuned
    # any other index refuses it, at load and before anything deploys
    with pytest.raises(ValueError, match="needs an HSNN index; this run serves 'mfli'"):
        RetrievalIndex(index_dir(tiny_mfli_run.path), ttt=True)
    with pytest.raises(ValueError, match="needs an HSNN index"):
        build_app(tiny_mfli_run.path, ServingSettings(retriever_ttt=True))


# ---------------------------------------------------------------- MFLI over HTTP
@pytest.fixture(scope="module")
def mfli_url(ray_session, tiny_mfli_run: RunDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = ServingSettings(feedback_dir=str(tmp_path_factory.mktemp("feedback")), min_replicas=1, max_replicas=1)
    try:
        yield serve_app(tiny_mfli_run.path, port=PORT, settings=settings)
    finally:
        shutdown_serve()


def test_serve_round_trip_answers_from_the_mfli_index(mfli_url: str, tiny_mfli_run: RunDir, mfli_served: RetrievalIndex) -> None:
    user = int(read_embedding_table(Path(tiny_mfli_run.index_dir) / "users.parquet", "user_id")[0][0])
    with httpx.Client(base_url=mfli_url, timeout=30) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert (ready.json()["index"], ready.json()["beam"]) == ("mfli", mfli_served.info()["beam"])
        response = client.post("/recommend", json={"user_id": user, "k": K})
    assert response.status_code == 200, response.text
    body = response.json()
    (expected,) = mfli_served.search([Query(user, K)])
    assert body["fallback"] is None and body["index"] == "mfli"
    assert [item["item_id"] for item in body["items"]] == expected.item_ids
