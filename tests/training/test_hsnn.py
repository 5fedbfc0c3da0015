"""HSNN: MoNN scorer, tree health and cold start, test-time training, and one tiny 2-worker run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import JaggedTensor

from training.index.hsnn_index import HSNNIndex
from training.models.hsnn import MoNNScorer, NodeFrequency, UserState, pad_history
from training.models.hsnn_tree import (
    ContentPlacer,
    HSNNTree,
    content_matrix,
    content_vocabulary,
    entropy,
    tree_metrics,
)
from training.models.hsnn_ttt import TTTConfig, TTTPool, TTTRetriever
from training.models.rq import ResidualQuantizer
from training.retrieval.protocol import PAD_ITEM_ID


# ---------------------------------------------------------------- scorer
def _scorer(seed=0, d=8, h=16, levels=2):
    torch.manual_seed(seed)
    scorer = MoNNScorer(d, h, levels, attention_dim=4)
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0, 0.3)
    return scorer


def test_shared_targets_score_like_per_user_targets():
    scorer = _scorer()
    u, hist = torch.randn(3, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    state = scorer.prepare(UserState(u, hist * mask.unsqueeze(-1), mask))
    targets = torch.randn(7, 8)
    shared = scorer(state, targets, level=1)  # [3, 7], target projections computed once
    per_user = scorer(state, targets.expand(3, -1, -1), level=1)  # [3, 7, 8] per-user path
    torch.testing.assert_close(shared, per_user, rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(shared).all())  # user 1 has no history
    # more than a dot product: the level modules, MLP and attention change the ranking
    assert not torch.allclose(shared, u @ targets.T, atol=1e-3)
    # the history matters: another history, another score
    other = scorer.prepare(UserState(u, torch.randn(3, 5, 8) * mask.unsqueeze(-1), mask))
    assert not torch.allclose(scorer(other, targets, level=1)[0], shared[0])


def test_node_frequency_tracks_how_often_nodes_are_sampled():
    """The log-q of in-batch node softmax: popular nodes get a higher log q than rare ones."""
    g = torch.Generator().manual_seed(0)
    freq = NodeFrequency([4, 16], decay=0.99)
    probs = torch.tensor([0.7, 0.2, 0.08, 0.02])
    for _ in range(1000):
        nodes = torch.multinomial(probs, 256, replacement=True, generator=g)
        log_q = freq.update_and_log_q(0, nodes)
    estimate = freq.count_0 / freq.count_0.sum()
    torch.testing.assert_close(estimate, probs, atol=0.02, rtol=0.1)
    assert torch.isfinite(log_q).all()
    torch.testing.assert_close(log_q, torch.log(estimate[nodes]))
    assert freq.count_1.sum() == 0  # levels are counted separately
    assert "count_0" not in freq.state_dict()  # not checkpointed: re-estimated on resume


def test_pad_history_keeps_the_most_recent_items():
    jt = JaggedTensor(values=torch.arange(1, 8).float().unsqueeze(1), lengths=torch.tensor([5, 0, 2]))
    padded, mask = pad_history(jt, 3, 3)
    assert padded.squeeze(-1).tolist() == [[3, 4, 5], [0, 0, 0], [6, 7, 0]]
    assert mask.tolist() == [[True] * 3, [False] * 3, [True, True, False]]


def test_item_tower_reads_content_when_configured(ml100k_dir):
    """With ``model.content`` the item vector depends on the item's content as well as its id
    row, and the content tables join the sharded tables; without it, content changes nothing."""
    import pyarrow.parquet as pq

    from embeddings.tables import set_mpzch_training
    from training.data.loader import to_kjt
    from training.models.hsnn import HSNNModelConfig, build_hsnn, table_specs
    from training.models.item_content import ItemContent

    items = pq.read_table(ml100k_dir / "items.parquet").sort_by("item_id")
    # item 1 under its own content and under item 2's (Toy Story vs GoldenEye)
    swapped = items.slice(1, 1).set_column(0, items.schema.field(0), pa.array([1], pa.int64()))
    ids = pa.array([1, 2], pa.int64())
    vectors = {}
    for content in (True, False):
        cfg = HSNNModelConfig(dim=16, embedding_dim=16, hidden=[32], scorer_hidden=8, codes=4, content=content)
        assert [t.name for t in table_specs(cfg)] == ["user", "item", *(["genre", "year", "title"] if content else [])]
        for name, table in (("own", items), ("swapped", pa.concat_tables([swapped, items.slice(1)]))):
            torch.manual_seed(0)
            model = build_hsnn(cfg, torch.device("cpu"), history_len=4)
            model.set_catalogue(torch.from_numpy(items.column("item_id").to_numpy().copy()))
            model.set_content(ItemContent.from_items(table))
            batch = pa.table({"user_id": ids, "item_id": ids, "history": pa.array([[1]] * 2, pa.list_(pa.int64()))})
            model.train()  # inserts the ids and content tokens into the MPZCH tables
            model(to_kjt(batch))
            model.eval()
            set_mpzch_training(model, False)
            with torch.no_grad():
                _, item = model(to_kjt(pa.table({"item_id": ids}), present=["item_id"]))  # [2, 2D]
            vectors[content, name] = item[:, :16]
    assert not torch.allclose(vectors[True, "own"][0], vectors[True, "swapped"][0])  # content moved item 1
    torch.testing.assert_close(vectors[True, "own"][1], vectors[True, "swapped"][1])  # item 2 kept its content
    torch.testing.assert_close(vectors[False, "own"], vectors[False, "swapped"])  # id-only tower: no change


# ---------------------------------------------------------------- tree
def _clustered(n_per=40, groups=4, d=8, seed=0):
    """Items in ``groups`` tight clusters; each cluster has its own genre."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(groups, d, generator=g), dim=-1)
    vectors = F.normalize(centres.repeat_interleave(n_per, 0) + 0.05 * torch.randn(groups * n_per, d, generator=g), dim=-1)
    genres = [[f"g{i // n_per}"] for i in range(groups * n_per)]
    items = pa.table({
        "item_id": pa.array(np.arange(groups * n_per) + 100, pa.int64()),
        "year": pa.array([1990 + (i % 3) for i in range(groups * n_per)], pa.int32()),
        "genres": pa.array(genres, pa.list_(pa.string())),
    })
    return vectors, items


def _clustered_tree():
    """The clustered items, their IDs, and a 2-level tree over 4 learned codes (RQ trained once)."""
    vectors, items = _clustered()
    rq = ResidualQuantizer(8, 2, 4)
    rq.train()
    rq(vectors)
    ids = torch.from_numpy(items.column("item_id").to_numpy().copy())
    return vectors, items, ids, rq, HSNNTree.build(rq.codebooks, ids, vectors)


def test_tree_metrics_and_reassignment_share():
    vectors, items, ids, rq, tree = _clustered_tree()
    metrics = tree_metrics(tree)
    assert metrics["hsnn/l0/empty_share"] == 0.0 and metrics["hsnn/l0/entropy"] > 0.9  # 4 clusters, 4 codes
    assert int(tree.node_sizes(1).sum()) == len(ids)
    assert tree.changed_share(tree) == 0.0
    moved = HSNNTree.build(rq.codebooks, ids, vectors.roll(40, dims=0))  # every cluster moves to another
    assert moved.changed_share(tree) == 1.0
    assert entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert entropy(torch.tensor([20, 0, 0, 0])) == 0.0


def test_cold_items_are_placed_with_their_content_group():
    vectors, items, ids, rq, tree = _clustered_tree()
    vocabulary = content_vocabulary(items)
    placer = ContentPlacer.fit(content_matrix(items, vocabulary), vectors, vocabulary)
    cold = pa.table({
        "item_id": pa.array([1, 2, 3, 4], pa.int64()),
        "year": pa.array([1991, None, 1990, 2024], pa.int32()),
        "genres": pa.array([["g0"], ["g1"], ["g2"], ["g3", "never-seen"]], pa.list_(pa.string())),
    })
    codes = tree.encode(placer.predict(content_matrix(cold, vocabulary)))  # [4, L]
    warm_root = tree.node_ids(0)
    for group in range(4):
        majority = int(torch.mode(warm_root[group * 40 : (group + 1) * 40]).values)
        assert int(codes[group, 0]) == majority


# ---------------------------------------------------------------- test-time training
def _index(beam=2, n=120, d=8, levels=2, k=4):
    scorer = _scorer(1, d=d, levels=levels)
    vectors, _ = _clustered(n_per=n // 4, d=d)
    rq = ResidualQuantizer(d, levels, k)
    rq.train()
    rq(vectors)
    ids = torch.arange(n) + 1
    return HSNNIndex(scorer, HSNNTree.build(rq.codebooks, ids, vectors), vectors, F.normalize(torch.randn(n, d), dim=-1), beam)


def test_ttt_fine_tunes_on_visited_nodes_without_touching_the_index():
    index = _index()
    g = torch.Generator().manual_seed(3)
    pool = TTTPool(
        packs=torch.cat([F.normalize(torch.randn(300, 8, generator=g), dim=-1), torch.randint(-1, 120, (300, 4), generator=g).float()], 1),
        targets=torch.randint(0, 120, (300,), generator=g),
    )
    ttt = TTTRetriever(index, pool, TTTConfig(examples=32, steps=5, lr=0.05))
    before = {k: v.clone() for k, v in index.scorer.state_dict().items()}
    packs = pool.packs[:3]
    state = index.user_state(packs)
    _, visited, _ = index.descend(state, 2)
    rows = ttt.select(state.u[0], visited[0][0])
    assert 1 < rows.numel() <= 32
    assert set(ttt.pool_nodes[rows].tolist()) <= set(visited[0][0].tolist())
    tuned = ttt.fine_tune(rows)
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())
    result = ttt.search(packs, k=5, exclude=[torch.tensor([1, 2])] * 3)
    assert result.item_ids.shape == (3, 5) and ttt.seconds > 0 and ttt.selected > 0
    assert not ({1, 2} & set(result.item_ids.flatten().tolist()))
    assert result.stats["nodes_scored"] > 0 and 0 < result.stats["items_scored"] < 3 * 120
    assert all(torch.equal(before[k], v) for k, v in index.scorer.state_dict().items())


# ---------------------------------------------------------------- one tiny 2-worker run
# ``tiny_hsnn_run`` (tests/conftest.py): configs/tiny-hsnn.yaml trained once per session.


def test_joint_training_moves_assignments_and_stays_balanced(tiny_hsnn_run):
    records = list(tiny_hsnn_run.read_metrics())
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["loss/item"] < records[0]["loss/item"]
    # the tree follows the item vectors: items changed leaf between epochs
    assert 0.0 < records[1]["hsnn/changed_share"] <= 1.0
    for r in records:  # 8 x 8 tree: no collapse at the root, leaves spread out
        assert r["hsnn/l0/empty_share"] == 0.0
        assert r["hsnn/l0/entropy"] > 0.7 and r["hsnn/l1/entropy"] > 0.6
        assert sum(r["hsnn/l1/sizes"]) == 1682 and len(r["hsnn/l1/sizes"]) == 64
    last = records[-1]
    assert last["valid_beam/recall@10"] > 0.03  # random ranking: ~0.006
    assert last["valid_exhaustive/items_scored"] == 1682
    assert last["valid_beam/items_scored"] < 0.5 * 1682  # beam 4 of 64 leaves


def test_run_folder_holds_network_tables_and_tree(tiny_hsnn_run):
    ckpt = tiny_hsnn_run.checkpoints()[-1]
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "hsnn_tree" / "tree.pt").is_file()
    info = json.loads((tiny_hsnn_run.index_dir / "index.json").read_text())
    assert info["model"] == "hsnn" and info["num_items"] == 1682
    folder = tiny_hsnn_run.index_dir / "hsnn"
    index = HSNNIndex.load(folder)
    users = torch.load(folder / "users.pt")
    packs = users["packs"][:16]
    assert packs.shape == (16, 32 + 20)
    result = index.search(packs, k=10)
    full = index.with_beam(None).search(packs, k=10)
    assert result.item_ids.shape == (16, 10) and bool((result.item_ids != PAD_ITEM_ID).all())
    assert result.stats["nodes_scored"] == 16 * (8 + 4 * 8)
    assert full.stats["items_scored"] == 16 * 1682
    test = json.loads(tiny_hsnn_run.eval_path.read_text())
    assert 0 < test["test_beam/recall@10"] <= test["test_beam/recall@50"] <= 1
    placer = ContentPlacer.load(folder)
    assert placer.weight.shape == (len(placer.vocabulary) + 1, 32)
    # items with no training example (5 of ml-100k's) sit where their content puts them, not
    # at their never-trained id rows
    import pyarrow.parquet as pq

    dataset = json.loads((tiny_hsnn_run.index_dir / "index.json").read_text())["dataset"]
    items = pq.read_table(f"{dataset}/items.parquet").sort_by("item_id")
    trained = pq.read_table(f"{dataset}/interactions/train.parquet", columns=["item_id"]).column("item_id")
    untrained = ~np.isin(items.column("item_id").to_numpy(), trained.to_numpy())
    assert untrained.sum() == 5
    assert torch.equal(index.tree.item_ids, torch.from_numpy(items.column("item_id").to_numpy()))
    placed = placer.predict(content_matrix(items, placer.vocabulary))[torch.from_numpy(untrained)]
    torch.testing.assert_close(index.item_vectors[torch.from_numpy(untrained)], placed)
    assert next(tiny_hsnn_run.read_metrics())["hsnn/content_placed_share"] == pytest.approx(5 / 1682)
    pool = TTTPool.load(folder)
    assert pool.packs.shape == (2000, 52) and int(pool.targets.max()) < 1682
