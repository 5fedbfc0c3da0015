"""HSNN serving index: beam search against exhaustive MoNN scoring, stats, exclusion, persistence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.index.hsnn_index import HSNNIndex
from training.models.hsnn import MoNNScorer
from training.models.hsnn_tree import HSNNTree
from training.models.rq import ResidualQuantizer
from training.retrieval.protocol import PAD_ITEM_ID

D, H, T, L, K, N, B = 8, 16, 5, 2, 4, 120, 6


def _index(beam, seed=0, n=N):
    torch.manual_seed(seed)
    scorer = MoNNScorer(D, H, L)
    with torch.no_grad():  # a scorer whose MLP and attention terms matter, not only the dot product
        for p in scorer.parameters():
            p.normal_(0, 0.3)
    vectors = F.normalize(torch.randn(n, D), dim=-1)
    rq = ResidualQuantizer(D, L, K)
    rq.train()
    rq(vectors)  # k-means initialisation of the codebooks
    ids = torch.randperm(10 * n)[:n] + 1  # raw ids, unsorted, not 0..N-1
    tree = HSNNTree.build(rq.codebooks, ids, vectors)
    keys = F.normalize(torch.randn(n, D), dim=-1)
    return HSNNIndex(scorer, tree, vectors[torch.argsort(ids)], keys, beam)


def _packs(batch=B, n=N):
    u = F.normalize(torch.randn(batch, D), dim=-1)
    rows = torch.randint(0, n, (batch, T)).float()
    rows[0] = -1  # a user with no history
    rows[1, :3] = -1  # a short history
    return torch.cat([u, rows], dim=1)


def test_beam_over_all_nodes_equals_exhaustive():
    index = _index(beam=K**L)
    packs = _packs()
    exclude = [index.tree.item_ids[torch.randperm(N)[:7]] for _ in range(B)]
    beam = index.search(packs, k=20, exclude=exclude)
    full = index.with_beam(None).search(packs, k=20, exclude=exclude)
    assert torch.equal(beam.item_ids, full.item_ids)
    torch.testing.assert_close(beam.scores, full.scores, rtol=1e-5, atol=1e-5)
    for b in range(B):
        assert not set(beam.item_ids[b].tolist()) & set(exclude[b].tolist())
    assert beam.stats["items_scored"] == full.stats["items_scored"] == B * N


def test_narrow_beam_counts_nodes_and_items_and_returns_reached_leaf_items():
    index = _index(beam=2)
    packs = _packs()
    result = index.search(packs, k=10)
    state = index.user_state(packs)
    leaves, visited, _ = index.descend(state, 2)
    assert [v.shape for v in visited] == [(B, 2), (B, 2)]
    # every leaf is a child of a kept root
    assert torch.equal(torch.div(leaves, K, rounding_mode="floor").unsqueeze(-1).eq(visited[0].unsqueeze(1)).any(-1), torch.ones(B, 2, dtype=torch.bool))
    leaf_of = dict(zip(index.tree.item_ids.tolist(), index.tree.node_ids(L - 1).tolist()))
    sizes = index.tree.node_sizes(L - 1)
    reached = sizes[leaves].sum(1)  # [B] items under each user's 2 leaves
    short = reached < 10  # those users are searched again, wider
    for b in range(B):
        got = [i for i in result.item_ids[b].tolist() if i != PAD_ITEM_ID]
        assert len(got) == 10
        if not short[b]:
            assert all(leaf_of[i] in leaves[b].tolist() for i in got)
    # level 0: K roots; level 1: K children of each of the 2 kept roots; plus the widened rows' work
    assert result.stats.get("rows_widened", 0) == int(short.sum())
    if short.any():
        assert result.stats["nodes_scored"] > B * (K + 2 * K) and result.stats["items_scored"] > int(reached.sum())
    else:
        assert result.stats["nodes_scored"] == B * (K + 2 * K) and result.stats["items_scored"] == int(reached.sum())
    assert result.stats["items_scored"] < B * N


def test_a_user_whose_leaves_hold_fewer_than_k_unseen_items_is_searched_wider():
    """Beam 1 reaches one leaf (a few items) and this user has seen most of the catalogue: the
    row is searched again with a wider beam, up to every item, until it has k items."""
    index = _index(beam=1)
    packs = _packs(2)
    seen = [index.tree.item_ids[: N - 12], index.tree.item_ids[:0]]
    result = index.search(packs, k=10, exclude=seen)
    full = index.with_beam(None).search(packs, k=10, exclude=seen)
    assert bool((result.item_ids != PAD_ITEM_ID).all())
    assert not set(result.item_ids[0].tolist()) & set(seen[0].tolist())
    assert torch.equal(result.item_ids[0], full.item_ids[0])  # 12 unseen items: only the whole catalogue has 10 of them
    assert result.stats["rows_widened"] >= 1


def test_a_batch_scored_in_blocks_gives_the_same_results(monkeypatch):
    import training.index.hsnn_index as hsnn_index

    index = _index(beam=3)
    packs = _packs()
    exclude = [index.tree.item_ids[torch.randperm(N)[:5]] for _ in range(B)]
    whole = index.search(packs, k=15, exclude=exclude)
    monkeypatch.setattr(hsnn_index, "BLOCK_SLOTS", 1)  # every batch > 1 is split down to single users
    split = index.search(packs, k=15, exclude=exclude)
    assert torch.equal(split.item_ids, whole.item_ids)
    torch.testing.assert_close(split.scores, whole.scores)
    assert split.stats == whole.stats


def test_a_batch_gives_each_user_what_a_search_of_that_user_alone_gives():
    # users reach leaves of different sizes, so the batch is scored in several width groups
    index = _index(beam=2)
    packs = _packs()
    batch = index.search(packs, k=10)
    for user in range(B):
        alone = index.search(packs[user : user + 1], k=10)
        assert torch.equal(batch.item_ids[user], alone.item_ids[0])
        torch.testing.assert_close(batch.scores[user], alone.scores[0])


def test_width_groups_keep_counts_within_a_factor_of_two_and_blocks_bounded():
    from training.index.hsnn_index import BLOCK_SLOTS, _width_groups

    counts = torch.tensor([1, 3000, 5, 40_000, 4, 2500, 0, 7, 6000, 3100])
    groups = _width_groups(counts)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(counts)))  # every user once
    for group in groups:
        sizes = counts[group].clamp(min=1)
        assert int(sizes.max()) < 2 * int(sizes.min())
        assert len(group) == 1 or len(group) * int(sizes.max()) <= BLOCK_SLOTS


def test_rows_padded_only_when_the_catalogue_holds_fewer_than_k():
    index = _index(beam=1)
    result = index.search(_packs(2), k=N)  # beam 1 reaches a few items; widening reaches all N
    assert result.item_ids.shape == (2, N) and bool((result.item_ids != PAD_ITEM_ID).all())
    result = index.search(_packs(2), k=N + 5)
    padded = result.item_ids == PAD_ITEM_ID
    assert padded.sum(1).tolist() == [5, 5] and bool(padded[:, N:].all())
    assert bool(torch.isneginf(result.scores[padded]).all())
    assert bool(torch.isfinite(result.scores[~padded]).all())


def test_save_and_load_round_trip(tmp_path):
    index = _index(beam=3)
    index.save(tmp_path / "hsnn", {"version": "t"})
    loaded = HSNNIndex.load(tmp_path / "hsnn")
    packs = _packs()
    a, b = index.search(packs, k=5), loaded.search(packs, k=5)
    assert torch.equal(a.item_ids, b.item_ids) and loaded.beam == 3
    assert loaded.node_scoring == "item_mean"
    assert HSNNIndex.load(tmp_path / "hsnn", node_scoring="codebook").node_scoring == "codebook"


def test_item_mean_nodes_are_scored_as_the_mean_of_their_items():
    """With ``item_mean`` a node is the item module at its items' mean vector: when every leaf
    holds one item, keeping all roots and the b best leaves returns the exhaustive top-b
    exactly. Scoring leaves by their codewords (random here, unrelated to the items) does not."""
    torch.manual_seed(3)
    scorer = MoNNScorer(D, H, L)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0, 0.3)
    n = K**L  # one item per leaf: item i has code path (i // K, i % K)
    codes = torch.stack([torch.arange(n) // K, torch.arange(n) % K], dim=1)
    ids = torch.arange(n) * 7 + 1
    tree = HSNNTree(torch.randn(L, K, D), ids, codes)
    vectors, keys = F.normalize(torch.randn(n, D), dim=-1), F.normalize(torch.randn(n, D), dim=-1)
    index = HSNNIndex(scorer, tree, vectors, keys, beam=K)
    torch.testing.assert_close(index._node_vectors[0][1], vectors[K : 2 * K].mean(0))  # root 1: items 4..7
    torch.testing.assert_close(index._node_vectors[1], vectors)  # a leaf is its item
    packs = _packs(B, n)
    exhaustive = index.with_beam(None).search(packs, k=K)
    assert torch.equal(index.search(packs, k=K).item_ids, exhaustive.item_ids)
    by_codewords = HSNNIndex(scorer, tree, vectors, keys, beam=K, node_scoring="codebook")
    assert not torch.equal(by_codewords.search(packs, k=K).item_ids, exhaustive.item_ids)


def test_dot_vectors_give_the_monn_dot_term_and_rescoring_every_item_is_exhaustive():
    """The FAISS baseline on HSNN's vectors (issue 27): FAISS holds the MoNN's dot term, and
    its candidates re-ranked by the MoNN equal exhaustive search once every item is a candidate."""
    from training.index.hsnn_index import RescoredRetriever
    from training.retrieval.exact import ExactRetriever

    index = _index(beam=2)
    packs = _packs()
    u = packs[:, :D]
    level = index.tree.levels
    t = index.item_vectors * (1 + index.scorer.level_scale[level]) + index.scorer.level_bias[level]
    torch.testing.assert_close(u @ index.dot_vectors().T, u @ t.T)
    exclude = [index.tree.item_ids[torch.randperm(N)[:7]] for _ in range(B)]
    full = index.with_beam(None).search(packs, k=20, exclude=exclude)
    rescored = RescoredRetriever(index, ExactRetriever(index.tree.item_ids, index.dot_vectors()), fetch=N).search(packs, 20, exclude)
    assert torch.equal(rescored.item_ids, full.item_ids)
    torch.testing.assert_close(rescored.scores, full.scores, rtol=1e-5, atol=1e-5)


def test_a_capacity_capped_tree_serves_the_same_items_and_no_leaf_passes_its_cap():
    """The capped tree (model.max_leaf_ratio) is a drop-in: every item in one leaf, no leaf past
    ceil(ratio * mean), and a beam over every node still finds the exhaustive answer."""
    torch.manual_seed(3)
    greedy = _index(beam=K**L, seed=3)
    skewed = greedy.item_vectors.clone()
    skewed[: N // 2] = F.normalize(skewed[0] + 0.01 * torch.randn(N // 2, D), dim=-1)  # half the catalogue in one spot
    ids = greedy.tree.item_ids
    loose = HSNNTree.build(greedy.tree.codebooks, ids, skewed)
    capped = HSNNTree.build(greedy.tree.codebooks, ids, skewed, max_leaf_ratio=2.0)
    cap = -(-2.0 * N // K**L)
    assert loose.node_sizes(L - 1).max() > cap  # the greedy tree piles the clump into a few leaves
    assert capped.node_sizes(L - 1).max() <= cap and capped.node_sizes(L - 1).sum() == N
    assert capped.node_sizes(0).max() <= -(-2.0 * N // K)
    index = HSNNIndex(greedy.scorer, capped, skewed, greedy.history_keys, beam=K**L)
    packs = _packs()
    beam, full = index.search(packs, k=20), index.with_beam(None).search(packs, k=20)
    assert torch.equal(beam.item_ids, full.item_ids)
