"""The MFLI index in-process: beam lookup vs exact search, stats, real-time updates, disk round trip."""

from __future__ import annotations

import pytest
import torch

from training.index.mfli_beam import beam_search
from training.index.mfli_index import MFLIIndex, path_keys
from training.models.rq import ResidualQuantizer
from training.retrieval import PAD_ITEM_ID, ExactRetriever, Retriever

DIMS = {"engagement": 6, "semantic": 4}
LEVELS, CODES = 2, 8


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensor ops on a shared 2-core machine run far faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _catalogue(n: int = 400, seed: int = 0) -> tuple[MFLIIndex, torch.Tensor, dict[str, torch.Tensor]]:
    """n items with raw sparse ids, clustered facet vectors and codebooks trained on them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * n, generator=g)[:n] * 7919 + 3  # raw, unordered ids
    embs, codebooks = {}, {}
    for name, d in DIMS.items():
        centres = torch.randn(12, d, generator=g)
        emb = centres[torch.randint(0, 12, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
        emb = torch.nn.functional.normalize(emb, dim=1)  # as the model's facet vectors
        rq = ResidualQuantizer(d, LEVELS, CODES)
        rq.train()
        for _ in range(20):
            rq(emb)
        embs[name], codebooks[name] = emb, rq.codebooks.clone()
    index = MFLIIndex(codebooks, beam=2, depth=1)
    index.add_items(ids, embs)
    return index, ids, embs


def _users(b: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, sum(DIMS.values()), generator=torch.Generator().manual_seed(seed))


def test_beam_over_all_codes_equals_exact_search():
    index, ids, embs = _catalogue()
    exact = ExactRetriever(ids, torch.cat([embs["engagement"], embs["semantic"]], dim=1))
    users = _users(6)
    exclude = [ids[:5], torch.tensor([], dtype=torch.int64), ids[10:40], torch.tensor([123456789]), ids[:1], ids[-3:]]
    for depth, beam in [(1, CODES), (2, CODES * CODES)]:
        index.depth, index.beam = depth, beam
        got, want = index.search(users, 25, exclude), exact.search(users, 25, exclude)
        assert torch.equal(got.item_ids, want.item_ids)
        torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)
        assert got.stats["items_scored"] == 6 * len(ids)  # every item, once per user across facets
    assert isinstance(index, Retriever)


def test_stats_count_nodes_and_items_and_narrow_beams_score_less():
    index, ids, _ = _catalogue()
    users = _users(3)
    index.depth, index.beam = 2, 3
    result = index.search(users, 10)
    # per facet: K level-0 nodes, then beam x K children, for each of the 3 users
    assert result.stats["nodes_scored"] == 2 * 3 * (CODES + 3 * CODES)
    assert 0 < result.stats["items_scored"] < 3 * len(ids)
    index.depth, index.beam = 1, 2
    wide = index.search(users, 10)
    index.beam = 1
    narrow = index.search(users, 10)
    assert narrow.stats["items_scored"] < wide.stats["items_scored"]
    assert narrow.stats["nodes_scored"] == wide.stats["nodes_scored"] == 2 * 3 * CODES


def test_padding_when_fewer_candidates_than_k():
    index, _, _ = _catalogue(n=30)
    index.depth, index.beam = 2, 1  # one leaf path per facet: a handful of items
    result = index.search(_users(2), 20)
    assert result.item_ids.shape == (2, 20)
    padded = result.item_ids == PAD_ITEM_ID
    assert padded.any() and torch.isneginf(result.scores[padded]).all()
    real = result.scores[~padded]
    assert torch.isfinite(real).all()


def test_beam_search_keeps_the_best_prefixes():
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(2, 5, 4, generator=g)
    user = torch.randn(1, 4, generator=g)
    prefixes, nodes = beam_search(user, cb, beam=25, depth=2)
    # all 25 paths, ordered by the user's score of their summed codewords
    paths = torch.stack([prefixes[0] // 5, prefixes[0] % 5], dim=1)
    scores = (cb[0][paths[:, 0]] + cb[1][paths[:, 1]]) @ user[0]
    assert torch.all(scores[:-1] >= scores[1:] - 1e-6) and len(set(prefixes[0].tolist())) == 25
    assert nodes == 5 + 5 * 5


def test_empty_prefixes_never_take_a_beam_slot():
    """At catalogue scale most deep prefixes are empty; the beam must only keep occupied ones."""
    g = torch.Generator().manual_seed(5)
    cb = {"engagement": torch.randn(2, 16, 6, generator=g), "semantic": torch.randn(2, 16, 4, generator=g)}
    index = MFLIIndex(cb, beam=4, depth=2)
    # 12 items, all under 3 of the 256 level-1 prefixes of each facet
    codes = torch.tensor([[0, 1], [5, 2], [9, 9]]).repeat(4, 1)
    ids = torch.arange(12) + 100
    index.add_items(ids, {n: torch.randn(12, c.shape[2], generator=g) for n, c in cb.items()},
                    codes={n: codes for n in cb})
    users = _users(5)
    result = index.search(users, 12)
    # 4 prefixes kept per facet and only 3 exist: every item is gathered for every user
    assert result.stats["items_scored"] == 5 * 12
    assert torch.equal(result.item_ids.sort(dim=1).values, ids.expand(5, -1))
    prefixes, _ = beam_search(users[:, :6], cb["engagement"], 4, 2, index.occupied_prefixes("engagement")[:2])
    assert set(prefixes[0].tolist()) == {1, 5 * 16 + 2, 9 * 16 + 9, -1}

    # an item added under a new prefix is reachable at once; removal leaves no wrong results
    index.add_items(torch.tensor([7]), {n: torch.randn(1, c.shape[2], generator=g) for n, c in cb.items()},
                    codes={n: torch.tensor([[15, 15]]) for n in cb})
    assert (index.search(users, 13).item_ids == 7).any(dim=1).all()
    index.remove_items(torch.tensor([7]))
    assert not (index.search(users, 13).item_ids == 7).any()


def test_add_remove_reassign_without_rebuild(tmp_path):
    index, ids, embs = _catalogue()
    users = _users(4)
    index.depth, index.beam = 1, CODES  # lookup == exact: any miss is an index bug
    victim = int(index.search(users[:1], 1).item_ids[0, 0])
    assert index.remove_items(torch.tensor([victim])) == 1
    assert victim not in index.search(users, 50).item_ids
    assert len(index) == len(ids) - 1

    # a new item right on user 0's vectors wins user 0's top-1 at once
    new_id = 10**12 + 5
    u0 = users[0]
    index.add_items(torch.tensor([new_id]), {"engagement": 10 * u0[:6].unsqueeze(0), "semantic": 10 * u0[6:].unsqueeze(0)})
    assert int(index.search(users[:1], 1).item_ids[0, 0]) == new_id

    # move an item far away in the engagement facet: it changes posting list and is found there
    moving = ids[7:8]
    before = index.codes_of("engagement", moving)
    far = -10 * embs["engagement"][7:8]
    assert index.reassign(moving, {"engagement": far}) >= 1
    after = index.codes_of("engagement", moving)
    assert not torch.equal(before, after)
    assert torch.equal(after, index.encode("engagement", far))
    index.beam = 1  # only the single best level-0 code of a user aligned with the new vector
    aligned = torch.cat([far / far.norm(), torch.zeros(1, 4)], dim=1)
    assert int(moving) in index.search(aligned, 400).item_ids
    index.beam = CODES

    # compaction and a disk round trip change nothing
    want = index.search(users, 30, [ids[:3]] * 4)
    index.compact()
    assert torch.equal(index.search(users, 30, [ids[:3]] * 4).item_ids, want.item_ids)
    index.save(tmp_path / "mfli")
    loaded = MFLIIndex.load(tmp_path / "mfli", beam=CODES, depth=1)
    assert len(loaded) == len(index)
    assert torch.equal(loaded.search(users, 30, [ids[:3]] * 4).item_ids, want.item_ids)
    assert torch.equal(loaded.codes_of("engagement", moving), after)


def test_cold_item_in_one_facet_is_retrievable_immediately():
    index, ids, _ = _catalogue()
    # a cold item: content (semantic) vector only, no engagement entry
    cold = torch.tensor([777_000_001])
    vec = torch.nn.functional.normalize(torch.tensor([[1.0, -2.0, 0.5, 1.0]]), dim=1)
    index.add_items(cold, {"semantic": vec})
    assert torch.equal(index.codes_of("engagement", cold), torch.full((1, LEVELS), -1))
    assert torch.equal(index.codes_of("semantic", cold), index.encode("semantic", vec))
    user = torch.cat([torch.zeros(1, 6), vec], dim=1)  # a user who likes exactly this content
    index.depth, index.beam = 1, 2  # two of the eight level-0 codes per facet
    result = index.search(user, 5)
    assert int(result.item_ids[0, 0]) == int(cold)
    # the user's engagement part is zero, so which two engagement codes win is a tie: only
    # "fewer than the whole catalogue" holds whatever the tie-break
    assert result.stats["items_scored"] < len(ids)
    # tail entries are found before and after compaction
    index.compact()
    assert int(index.search(user, 5).item_ids[0, 0]) == int(cold)


def test_path_keys_are_lexicographic():
    codes = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [3, 3, 3]])
    assert path_keys(codes, 4).tolist() == [1, 4, 16, 63]


def test_cold_items_readded_from_content_only_keep_their_content_entry():
    from training.eval.retrieval_bench import add_cold_items, overlap_at

    index, ids, embs = _catalogue()
    cold = ids[:5]
    index.depth, index.beam = 1, CODES
    users = _users(3)
    content_only = lambda ids: {"semantic": embs["semantic"][:5]}  # noqa: E731 (the 5 cold ids, in order)
    assert add_cold_items(index, torch.cat([cold, torch.tensor([-42])]), content_only) == 5  # unknown ids skipped
    assert len(index) == len(ids)
    assert (index.codes_of("engagement", cold) == -1).all()  # no collaborative entry any more
    assert torch.equal(index.codes_of("semantic", cold), index.encode("semantic", embs["semantic"][:5]))
    torch.testing.assert_close(index.facet_vectors("semantic", cold), embs["semantic"][:5])
    # exact over (engagement zeroed for the cold items) = what the index now returns
    emb = torch.cat([embs["engagement"], embs["semantic"]], dim=1)
    emb[:5, :6] = 0
    want = ExactRetriever(ids, emb).search(users, 20).item_ids
    got = index.search(users, 20).item_ids
    assert torch.equal(got, want)
    assert overlap_at(got, want) == 1.0
    assert overlap_at(got[:, :10], want) == 0.5


def test_compiled_lookup_matches_the_batched_torch_lookup():
    """Lookups run per user through compiled kernels (the serving path); they must return what the batched torch
    path does, with postings in every state: fresh tails, removed and re-coded rows, compacted."""
    index, ids, embs = _catalogue(n=600, seed=4)
    index.compact()
    g = torch.Generator().manual_seed(9)
    users = _users(8, seed=2)
    exclude = [ids[i * 7 : i * 7 + 5] for i in range(8)]
    exclude[3] = torch.tensor([], dtype=torch.int64)

    def agree() -> None:
        for depth, beam in [(1, 3), (2, 5), (2, 64), (1, CODES)]:
            index.depth, index.beam = depth, beam
            index.compiled_lookup = False
            want = index.search(users, 40, exclude)
            index.compiled_lookup = True
            got = index.search(users, 40, exclude)
            assert torch.equal(got.item_ids, want.item_ids), (depth, beam)
            torch.testing.assert_close(got.scores, want.scores, atol=1e-5, rtol=1e-5)
            assert got.stats == want.stats
            one = index.search(users[5:6], 40, exclude[5:6])
            assert torch.equal(one.item_ids[0], want.item_ids[5])

    agree()  # compacted, no stale entries
    # past capacity, so the index reallocates the tensors the compiled path holds views of
    extra = index._ids.numel() - index._rows + 5
    new = torch.arange(extra) + 10**9
    index.add_items(new, {n: torch.randn(extra, d, generator=g) for n, d in DIMS.items()})  # tail entries
    index.remove_items(ids[100:130])  # stale entries
    index.reassign(ids[200:240], {"engagement": torch.randn(40, DIMS["engagement"], generator=g)})
    assert len(index._postings["engagement"].tail_keys) > 0 and index._stale["engagement"]
    agree()
    index.compact()
    agree()
    # fewer candidates than k: both paths pad the same way
    index.depth, index.beam = 2, 1
    got = index.search(users[:2], 500)
    assert (got.item_ids == PAD_ITEM_ID).any()
    index.compiled_lookup = False
    assert torch.equal(got.item_ids, index.search(users[:2], 500).item_ids)


def test_compiled_beam_search_matches_the_torch_beam_search_at_every_depth():
    """The compiled beam search stops expanding early (children best first, parents best first);
    it must keep exactly the prefixes the reference ranks best, with empty prefixes skipped,
    down to depth 3 where beam_search's parents come from two earlier cuts."""
    import numpy as np

    from training.index import mfli_lookup

    g = torch.Generator().manual_seed(5)
    levels, codes, dim = 3, 6, 5
    codebooks = torch.randn(levels, codes, dim, generator=g)
    flat = torch.zeros(codes + codes**2 + codes**3)
    flat[torch.rand(flat.shape, generator=g) < 0.35] = float("-inf")  # a third of the prefixes empty
    tables, start = [], 0
    for d in range(1, levels + 1):
        tables.append(flat[start : start + codes**d].view(codes ** (d - 1), codes))
        start += codes**d
    users = torch.randn(20, dim, generator=g)
    for depth in (1, 2, 3):
        for beam in (1, 2, 5, 36, 300):
            want, _ = beam_search(users, codebooks, beam, depth, tables[:depth])
            for u in range(len(users)):
                got = mfli_lookup.beam_prefixes(users[u].numpy(), codebooks.numpy(), flat.numpy(), beam, depth)
                kept = want[u][want[u] >= 0].numpy()
                assert np.array_equal(got, kept), (depth, beam, u)


def test_index_pickles_and_searches_the_same():
    """Ray ships objects by pickle; the compiled path's per-thread scratch must not break that."""
    import pickle

    index, ids, _ = _catalogue()
    index.depth, index.beam = 2, 6
    users = _users(3)
    want = index.search(users, 20, [ids[:4]] * 3)
    copy = pickle.loads(pickle.dumps(index))
    assert torch.equal(copy.search(users, 20, [ids[:4]] * 3).item_ids, want.item_ids)


def test_interleaved_latency_times_every_point_in_rounds():
    """The benchmark's equal-latency comparisons read across points timed in shared rounds."""
    from training.eval.harness import EvalSet
    from training.eval.retrieval_bench import interleaved_latency

    index, ids, _ = _catalogue()
    users = _users(4)
    data = EvalSet(torch.arange(4), users, ids[:4], [ids[4:6]] * 4)
    set_to = []

    def setup(beam: int):
        def go():
            set_to.append(beam)
            index.depth, index.beam = 2, beam
            return index
        return go

    timed = interleaved_latency([(b, setup(b), data) for b in (1, 4, 16)], calls=6, rounds=3)
    assert set(timed) == {1, 4, 16}
    assert all(0 < t["latency_ms_p50"] <= t["latency_ms_p99"] for t in timed.values())
    # 3 rounds x 3 points, each round starting one point later
    assert set_to == [1, 4, 16, 4, 16, 1, 16, 1, 4]


def test_eval_set_rows_and_sample_keep_each_user_whole():
    """Benchmarks time and score subsets; a user's embedding, target and seen items must travel
    together, in the original order."""
    from training.eval.harness import EvalSet

    n = 20
    data = EvalSet(torch.arange(n) * 10, torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3),
                   torch.arange(n) + 1000, [torch.tensor([i, i + 1]) for i in range(n)])
    picked = data.sample(7, seed=3)
    assert len(picked.user_ids) == 7 and bool((picked.user_ids.diff() > 0).all())
    rows = (picked.user_ids // 10).tolist()
    assert torch.equal(picked.user_emb[:, 0], torch.tensor(rows, dtype=torch.float32))
    assert picked.targets.tolist() == [r + 1000 for r in rows]
    assert [e.tolist() for e in picked.exclude] == [[r, r + 1] for r in rows]
    assert torch.equal(data.sample(7, seed=3).user_ids, picked.user_ids)  # reproducible
    assert len(data.sample(50).user_ids) == n  # all of them when fewer


def test_item_vectors_are_what_the_lookup_scores_and_faiss_over_them_finds_its_top100():
    """A FAISS baseline on "the same vectors" holds exactly what MFLI scores (issue 27)."""
    pytest.importorskip("faiss")
    from training.eval.retrieval_bench import overlap_at
    from training.retrieval.faiss_retriever import FaissConfig, FaissRetriever

    index, ids, embs = _catalogue()
    index.remove_items(ids[:3])  # removed items are not vectors the lookup scores
    got_ids, got_emb = index.item_vectors()
    assert sorted(got_ids.tolist()) == sorted(ids[3:].tolist())
    by_id = dict(zip(ids.tolist(), torch.cat([embs["engagement"], embs["semantic"]], dim=1)))
    torch.testing.assert_close(got_emb, torch.stack([by_id[i] for i in got_ids.tolist()]))
    users = _users(5)
    index.depth, index.beam = 1, CODES  # exhaustive
    own_exact = index.search(users, 50).item_ids
    faiss_ivf = FaissRetriever(got_ids, got_emb, FaissConfig("ivf", nlist=8, nprobe=8))
    assert overlap_at(faiss_ivf.search(users, 50).item_ids, own_exact) == pytest.approx(1.0)


def test_interleaved_latency_at_batch_256_passes_whole_batches():
    from training.eval.harness import EvalSet
    from training.eval.retrieval_bench import interleaved_latency

    index, ids, _ = _catalogue()
    users = _users(10)
    data = EvalSet(torch.arange(10), users, ids[:10], [ids[10:12]] * 10)
    sizes = []

    class Spy:
        def search(self, user_emb, k, exclude=None):
            sizes.append((user_emb.shape[0], len(exclude)))
            return index.search(user_emb, k, exclude)

    timed = interleaved_latency([("spy", Spy, data)], calls=2, rounds=2, batch=256)
    assert timed["spy"]["latency_ms_p50"] > 0
    assert set(sizes) == {(256, 256)}  # users wrap around the 10 in the set
