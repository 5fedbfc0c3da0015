"""ExactRetriever against a plain reference: score all, mask, stable sort by (score desc, ID asc)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.retrieval import PAD_ITEM_ID, ExactRetriever, Retriever, SearchResult


def _reference(
    item_ids: torch.Tensor, item_emb: torch.Tensor, user_emb: torch.Tensor, k: int, exclude
) -> tuple[torch.Tensor, torch.Tensor]:
    """One user at a time, whole catalogue, lexsort: obviously right and slow."""
    ids_out, scores_out = [], []
    for b in range(user_emb.shape[0]):
        scores = (item_emb @ user_emb[b]).numpy()
        banned = set(exclude[b].tolist()) if exclude is not None else set()
        keep = np.array([i not in banned for i in item_ids.tolist()], dtype=bool)
        ids, sc = item_ids.numpy()[keep], scores[keep]
        order = np.lexsort((ids, -sc))[:k]  # last key is primary: score desc, then ID asc
        row_ids = np.full(k, PAD_ITEM_ID, dtype=np.int64)
        row_scores = np.full(k, -np.inf, dtype=np.float32)
        row_ids[: len(order)] = ids[order]
        row_scores[: len(order)] = sc[order]
        ids_out.append(row_ids)
        scores_out.append(row_scores)
    return torch.from_numpy(np.stack(ids_out)), torch.from_numpy(np.stack(scores_out))


def _catalogue(num_items: int, dim: int, seed: int, tied: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * num_items, generator=gen)[:num_items] * 7 + 3  # sparse, unsorted raw IDs
    if tied:  # small integer embeddings: many exactly equal scores
        emb = torch.randint(-1, 2, (num_items, dim), generator=gen).float()
    else:
        emb = torch.randn(num_items, dim, generator=gen)
    return ids.to(torch.int64), emb


def test_exact_is_a_retriever() -> None:
    ids, emb = _catalogue(5, 3, seed=0, tied=False)
    retriever = ExactRetriever(ids, emb)
    assert isinstance(retriever, Retriever)
    result = retriever.search(torch.randn(2, 3), k=3)
    assert isinstance(result, SearchResult)
    assert result.item_ids.dtype == torch.int64 and result.item_ids.shape == (2, 3)
    assert result.scores.dtype == torch.float32 and result.scores.shape == (2, 3)
    assert result.stats == {"items_scored": 10, "nodes_scored": 0}


@pytest.mark.parametrize("tied", [False, True])
def test_matches_reference_with_exclusion(tied: bool) -> None:
    ids, emb = _catalogue(300, 8, seed=1, tied=tied)
    users = torch.randn(6, 8) if not tied else torch.randint(-1, 2, (6, 8)).float()
    gen = torch.Generator().manual_seed(2)
    exclude = [ids[torch.randperm(300, generator=gen)[: 10 * b]] for b in range(6)]
    exclude[3] = torch.cat([exclude[3], torch.tensor([-5, 999_999_999])])  # unknown IDs: ignored
    result = ExactRetriever(ids, emb).search(users, k=25, exclude=exclude)
    want_ids, want_scores = _reference(ids, emb, users, 25, exclude)
    assert torch.equal(result.item_ids, want_ids)
    torch.testing.assert_close(result.scores, want_scores)
    for b in range(6):
        assert not set(result.item_ids[b].tolist()) & set(exclude[b].tolist())


def test_scores_descending_and_are_dot_products() -> None:
    ids, emb = _catalogue(50, 4, seed=3, tied=False)
    users = torch.randn(3, 4)
    result = ExactRetriever(ids, emb).search(users, k=10)
    assert bool((result.scores[:, :-1] >= result.scores[:, 1:]).all())
    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    for b in range(3):
        for item, score in zip(result.item_ids[b].tolist(), result.scores[b].tolist()):
            assert score == pytest.approx(float(users[b] @ emb[row_of[item]]), abs=1e-5)


def test_pads_when_k_exceeds_candidates() -> None:
    ids = torch.tensor([5, 1, 9], dtype=torch.int64)
    emb = torch.tensor([[1.0], [2.0], [3.0]])
    result = ExactRetriever(ids, emb).search(
        torch.tensor([[1.0], [1.0]]), k=5, exclude=[torch.tensor([9]), torch.tensor([], dtype=torch.int64)]
    )
    assert result.item_ids.tolist() == [[1, 5, -1, -1, -1], [9, 1, 5, -1, -1]]
    assert torch.isneginf(result.scores[0, 2:]).all() and torch.isneginf(result.scores[1, 3:]).all()
    assert result.scores[1, :3].tolist() == [3.0, 2.0, 1.0]


def test_everything_excluded_gives_all_padding() -> None:
    ids = torch.tensor([1, 2], dtype=torch.int64)
    result = ExactRetriever(ids, torch.ones(2, 2)).search(torch.ones(1, 2), k=2, exclude=[ids])
    assert result.item_ids.tolist() == [[-1, -1]]
    assert torch.isneginf(result.scores).all()


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 299, 300])
@pytest.mark.parametrize("tied", [False, True])
def test_chunked_equals_unchunked(chunk_size: int, tied: bool) -> None:
    ids, emb = _catalogue(300, 6, seed=4, tied=tied)
    users = torch.randint(-1, 2, (5, 6)).float() if tied else torch.randn(5, 6)
    exclude = [ids[b * 13 : b * 13 + 40] for b in range(5)]
    whole = ExactRetriever(ids, emb, chunk_size=10_000).search(users, k=30, exclude=exclude)
    chunked = ExactRetriever(ids, emb, chunk_size=chunk_size).search(users, k=30, exclude=exclude)
    assert torch.equal(whole.item_ids, chunked.item_ids)
    # Tiny chunks take a different BLAS kernel (gemv vs gemm): scores agree up to rounding.
    torch.testing.assert_close(whole.scores, chunked.scores)


def test_ties_go_to_the_lower_item_id_deterministically() -> None:
    ids = torch.tensor([50, 10, 40, 20, 30, 60], dtype=torch.int64)
    emb = torch.ones(6, 2)  # every item scores the same
    retriever = ExactRetriever(ids, emb, chunk_size=4)
    for _ in range(3):
        assert retriever.search(torch.ones(1, 2), k=4).item_ids.tolist() == [[10, 20, 30, 40]]
    # Ties broken the same way whatever order the catalogue arrived in.
    shuffled = ExactRetriever(ids.flip(0), emb)
    assert shuffled.search(torch.ones(1, 2), k=4).item_ids.tolist() == [[10, 20, 30, 40]]


def test_many_boundary_ties_in_a_large_chunk() -> None:
    """Width > 4k takes the topk-threshold path; ties straddle the k-th place."""
    ids = torch.arange(1000, dtype=torch.int64) * 3
    emb = torch.zeros(1000, 1)
    emb[::2] = 1.0  # 500 items tie for first place
    result = ExactRetriever(ids, emb).search(torch.ones(1, 1), k=20)
    assert result.item_ids.tolist() == [(ids[::2][:20]).tolist()]


def test_nan_scores_never_win() -> None:
    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    emb = torch.tensor([[1.0], [float("nan")], [0.5]])
    result = ExactRetriever(ids, emb).search(torch.ones(1, 1), k=3)
    assert result.item_ids.tolist() == [[1, 3, -1]]


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unique"):
        ExactRetriever(torch.tensor([1, 1]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        ExactRetriever(torch.empty(0, dtype=torch.int64), torch.empty(0, 2))
    retriever = ExactRetriever(torch.tensor([1, 2]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="k must be"):
        retriever.search(torch.ones(1, 2), k=0)
    with pytest.raises(ValueError, match="user_emb"):
        retriever.search(torch.ones(1, 3), k=1)
    with pytest.raises(ValueError, match="exclude"):
        retriever.search(torch.ones(2, 2), k=1, exclude=[torch.tensor([1])])


def test_from_index_dir_reads_items_parquet(tmp_path: Path) -> None:
    ids, emb = _catalogue(40, 5, seed=5, tied=False)
    table = pa.table(
        {
            "item_id": pa.array(ids.numpy(), pa.int64()),
            "embedding": pa.array(list(emb.numpy()), pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, tmp_path / "items.parquet", row_group_size=16)  # several chunks
    from_disk = ExactRetriever.from_index_dir(tmp_path)
    in_memory = ExactRetriever(ids, emb)
    users = torch.randn(4, 5)
    assert from_disk.num_items == 40 and from_disk.dim == 5
    assert torch.equal(from_disk.search(users, k=7).item_ids, in_memory.search(users, k=7).item_ids)
