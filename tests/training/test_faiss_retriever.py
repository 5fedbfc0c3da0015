"""FaissRetriever (training/retrieval/faiss_retriever.py): every kind builds over the vectors it is
given, masks seen items inside the search, and finds its own exact top-100 when searched exhaustively."""

from __future__ import annotations

import pytest
import torch

from training.eval.retrieval_bench import overlap_at
from training.retrieval.exact import ExactRetriever
from training.retrieval.faiss_retriever import FaissConfig, FaissRetriever

faiss = pytest.importorskip("faiss")

N, D, USERS, K = 600, 16, 20, 100


@pytest.fixture(scope="module")
def vectors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(N, generator=g) * 7 + 3  # raw ids, not row numbers, and not sorted
    items = torch.randn(N, D, generator=g)
    users = torch.randn(USERS, D, generator=g)
    seen = [ids[torch.randperm(N, generator=g)[: 10 * u]] for u in range(USERS)]  # 0 .. 190 seen items
    return ids, items, users, seen


@pytest.mark.parametrize(
    ("config", "exhaustive"),
    [
        (FaissConfig("ivf", nlist=16), 16),  # nprobe = nlist
        (FaissConfig("ivf_rq", rq_levels=2, rq_bits=2), 16),  # 4 x 4 residual code paths
        (FaissConfig("hnsw", m=8), N),  # efSearch = N: every node reachable is visited
    ],
    ids=["ivf", "ivf_rq", "hnsw"],
)
def test_exhaustive_search_finds_own_exact_top100(vectors, config: FaissConfig, exhaustive: int) -> None:
    ids, items, users, seen = vectors
    retriever = FaissRetriever(ids, items, config)
    assert retriever.index.ntotal == N
    if config.kind == "ivf_rq":
        assert retriever.config.nlist == 16
        assert isinstance(faiss.downcast_index(retriever.index.quantizer), faiss.ResidualCoarseQuantizer)
    own_exact = ExactRetriever(ids, items).search(users, K, exclude=seen).item_ids

    result = retriever.set_knob(exhaustive).search(users, K, exclude=seen)

    assert result.item_ids.shape == (USERS, K)
    assert overlap_at(result.item_ids, own_exact) == pytest.approx(1.0)
    for row, excluded in zip(result.item_ids, seen):
        assert not torch.isin(row, excluded).any()  # masked inside the search, never returned
    assert result.stats["items_scored"] > 0
    # a narrow search scores fewer items and finds less of the exact top-100
    narrow = retriever.set_knob(1).search(users, K, exclude=seen)
    assert overlap_at(narrow.item_ids, own_exact) < 1.0
    assert narrow.stats["items_scored"] < result.stats["items_scored"]


def test_scores_are_inner_products_of_the_given_vectors(vectors) -> None:
    ids, items, users, _ = vectors
    result = FaissRetriever(ids, items, FaissConfig("ivf", nlist=8, nprobe=8)).search(users[:3], 5)
    rows = torch.searchsorted(torch.sort(ids).values, result.item_ids)
    by_id = items[torch.argsort(ids)]
    expected = (users[:3].unsqueeze(1) * by_id[rows]).sum(-1)
    torch.testing.assert_close(result.scores, expected, rtol=1e-4, atol=1e-4)


def test_unknown_kind_is_rejected(vectors) -> None:
    ids, items, _, _ = vectors
    with pytest.raises(ValueError, match="unknown faiss index kind"):
        FaissRetriever(ids, items, FaissConfig("pq"))  # type: ignore[arg-type]


def test_sparse_raw_ids_are_masked_too(vectors) -> None:
    """Ids far larger than the catalogue take the binary-search row lookup, not the dense table."""
    ids, items, users, seen = vectors
    big = ids * 1_000_003
    retriever = FaissRetriever(big, items, FaissConfig("hnsw", m=8, ef_search=N))
    result = retriever.search(users, K, exclude=[s * 1_000_003 for s in seen])
    own_exact = ExactRetriever(big, items).search(users, K, exclude=[s * 1_000_003 for s in seen]).item_ids
    assert overlap_at(result.item_ids, own_exact) == pytest.approx(1.0)
    assert retriever._allowed.min() == 0xFF  # every row allowed again after the searches
