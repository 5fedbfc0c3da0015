"""The Retriever's index and batch search, in-process (no Ray): the logic behind /recommend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from serving.retriever import Query, RetrievalIndex
from serving.run_index import (
    Popularity,
    SeenItems,
    UserEmbeddings,
    index_dir,
    read_meta,
    read_titles,
    resolve_dataset_dir,
)
from tests.serving.toy_run import NUM_ITEMS, NUM_USERS, UNKNOWN_USER, VERSION, ToyRun


@pytest.fixture(scope="module")
def index(toy_run: ToyRun) -> RetrievalIndex:
    return RetrievalIndex(index_dir(toy_run.run_dir))


def test_known_users_get_their_exact_top_k_without_seen_items(index: RetrievalIndex, toy_run: ToyRun) -> None:
    users = toy_run.user_ids[:6].tolist()
    answers = index.search([Query(user_id=u, k=12) for u in users])
    for user, answer in zip(users, answers):
        assert answer.fallback is None
        assert answer.item_ids == toy_run.expected_top(user, 12)
        assert not set(answer.item_ids) & toy_run.seen[user]
        assert answer.scores == sorted(answer.scores, reverse=True)
        assert answer.batch_size == 6
        assert answer.index == "exact" and answer.items_scored == 6 * NUM_ITEMS  # every item, per user


def test_mixed_batch_keeps_each_requests_k_and_exclusion(index: RetrievalIndex, toy_run: ToyRun) -> None:
    heavy = max(toy_run.seen, key=lambda u: len(toy_run.seen[u]))
    queries = [
        Query(user_id=heavy, k=3, exclude_seen=False),
        Query(user_id=UNKNOWN_USER, k=5),
        Query(user_id=heavy, k=50, exclude_seen=True),
    ]
    first, cold, last = index.search(queries)
    assert first.item_ids == toy_run.expected_top(heavy, 3, exclude_seen=False)
    assert last.item_ids == toy_run.expected_top(heavy, 50, exclude_seen=True)
    assert cold.fallback == "popularity" and cold.index is None
    assert cold.item_ids == toy_run.popular[:5]
    assert cold.scores == sorted(cold.scores, reverse=True)


def test_unknown_user_gets_popularity_excluding_nothing(index: RetrievalIndex, toy_run: ToyRun) -> None:
    (answer,) = index.search([Query(user_id=UNKNOWN_USER, k=1000)])
    assert answer.fallback == "popularity"
    assert answer.item_ids == toy_run.popular  # the whole list: fewer than k items exist


def test_k_beyond_catalogue_returns_every_unseen_item_once(index: RetrievalIndex, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[3])
    (answer,) = index.search([Query(user_id=user, k=1000)])
    assert len(answer.item_ids) == NUM_ITEMS - len(toy_run.seen[user])
    assert -1 not in answer.item_ids and len(set(answer.item_ids)) == len(answer.item_ids)


def test_info_reports_the_index(index: RetrievalIndex) -> None:
    assert index.info() == {
        "model_version": VERSION, "num_items": NUM_ITEMS, "num_users": NUM_USERS, "index": "exact", "beam": None,
    }


def test_a_learned_index_the_run_lacks_is_an_error_not_exact_search(toy_run: ToyRun) -> None:
    path = index_dir(toy_run.run_dir)
    assert RetrievalIndex(path, index="exact").info()["index"] == "exact"
    for missing in ("mfli", "hsnn"):
        with pytest.raises(ValueError, match=f"index '{missing}' asked for, but the run trained 'two_tower'"):
            RetrievalIndex(path, index=missing)
    with pytest.raises(ValueError, match="index must be one of"):
        RetrievalIndex(path, index="faiss")  # type: ignore[arg-type]


def test_user_embeddings_lookup_flags_unknown_users() -> None:
    table = UserEmbeddings(torch.tensor([30, 10, 20]), torch.tensor([[3.0], [1.0], [2.0]]))
    emb, known = table.lookup(torch.tensor([20, 99, 10, 5]))
    assert known.tolist() == [True, False, True, False]
    assert emb[known].flatten().tolist() == [2.0, 1.0]


def test_seen_items_csr_lookup() -> None:
    seen = SeenItems(torch.tensor([7, 3, 7, 3, 9]), torch.tensor([70, 30, 71, 31, 90]))
    got = seen.for_users(torch.tensor([3, 4, 9, 7]))
    assert [sorted(t.tolist()) for t in got] == [[30, 31], [], [90], [70, 71]]
    empty = SeenItems(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    assert [t.numel() for t in empty.for_users(torch.tensor([1, 2]))] == [0, 0]


def test_popularity_resorts_by_count_then_id(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": [5, 2, 9, 1], "count": [1, 3, 3, 7]}), tmp_path / "p.parquet")
    popularity = Popularity.from_parquet(tmp_path / "p.parquet")
    ids, scores = popularity.top(3)
    assert ids.tolist() == [1, 2, 9] and scores.tolist() == [7.0, 3.0, 3.0]


def test_titles_and_relative_dataset_resolution(toy_run: ToyRun, tmp_path: Path) -> None:
    path = index_dir(toy_run.run_dir)
    meta = read_meta(path)
    elsewhere = os.getcwd()
    os.chdir(tmp_path)  # "data/toy" must resolve against the project, not the cwd
    try:
        dataset = resolve_dataset_dir(meta, path)
    finally:
        os.chdir(elsewhere)
    # a location (a path here; a run trained on object storage records its URI)
    assert Path(dataset) == (toy_run.run_dir.parent.parent / "data" / "toy").resolve()
    titles = read_titles(Path(dataset))
    assert {i: t for i, t in toy_run.titles.items() if t is not None} == titles
    assert read_titles(tmp_path) == {}  # no items.parquet: no titles, no crash
