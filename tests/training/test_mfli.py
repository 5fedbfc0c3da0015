"""MFLI: the residual quantizer, the content-only semantic facet, and one 2-worker training run."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO
from training.index.mfli_index import MFLIIndex
from training.models.rq import ResidualQuantizer, occupancy_metrics


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensor ops on a shared 2-core machine run far faster on one thread than on two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- residual quantizer


def _clustered(n: int, d: int, clusters: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_rq_training_reduces_error_changes_codes_and_balances():
    torch.manual_seed(0)
    x = _clustered(2000, 16, 24, seed=1)
    rq = ResidualQuantizer(16, levels=3, codes=32, decay=0.9)
    rq.train()
    rq(x[:256])  # initialises from the first batch
    first = rq.encode(x)
    first_error = (x - rq.decode(first)).pow(2).sum(1).mean()
    g = torch.Generator().manual_seed(2)
    for step in range(150):
        out = rq(x[torch.randint(0, len(x), (256,), generator=g)])
        if step % 30 == 29:
            rq.rebalance(x[torch.randint(0, len(x), (256,), generator=g)])
    rq.rebalance(x, gather=False)
    codes = rq.encode(x)
    error = (x - rq.decode(codes)).pow(2).sum(1).mean()
    assert error < 0.8 * first_error
    assert (codes != first).any(dim=1).float().mean() > 0.2  # training moved items between codes
    hist = rq.occupancy(codes)
    assert hist.shape == (3, 32) and (hist.sum(1) == len(x)).all()
    stats = occupancy_metrics("rq", hist)
    for level in range(3):
        assert stats[f"rq/l{level}/max_share"] < 3.5 / 32  # no code above 3.5x its fair share
        assert stats[f"rq/l{level}/dead_codes"] == 0
    # straight-through: the value is the reconstruction, the gradient reaches the input
    y = x[:8].clone().requires_grad_(True)
    rq.eval()
    out = rq(y)
    torch.testing.assert_close(out.quantized.detach(), rq.decode(out.codes))
    (out.quantized.sum() + out.commitment).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_dead_codes_are_reseeded_and_oversized_codes_split():
    x = _clustered(1000, 8, 10, seed=3)
    rq = ResidualQuantizer(8, levels=1, codes=16)
    rq.train()
    rq(x)
    # kill three codes (far away: nothing is assigned to them) and merge all of x into one
    rq.codebooks[0, :3] = 100.0
    before = rq.occupancy(rq.encode(x))[0]
    assert (before[:3] == 0).all()
    done = rq.rebalance(x, dead_share=0.1, split_share=3.0, gather=False)
    assert done["reseeded"] >= 3
    after = rq.occupancy(rq.encode(x))[0]
    assert (after > 0).all()
    assert after.max() < before.max() or before.max() <= 3 * len(x) / 16
    # one code holding everything is split until the largest is near its fair share
    rq.codebooks[0] = 0.0
    rq.codebooks[0, 0] = x.mean(0)
    rq.codebooks[0, 1:] = 50.0
    rq.ema_count[0] = 1.0
    for _ in range(4):
        rq.rebalance(x, dead_share=0.1, split_share=3.0, gather=False)
    final = rq.occupancy(rq.encode(x))[0]
    assert final.max() < 0.35 * len(x) and (final > 0).sum() >= 12


# ---------------------------------------------------------------- model: content-only semantic facet


def test_semantic_facet_is_content_only_and_a_new_item_is_retrievable_at_once(ml100k_dir):
    from embeddings.tables import set_mpzch_training
    from training.data.loader import to_kjt
    from training.models.item_content import ItemContent
    from training.models.mfli import MFLIModelConfig, build_mfli, facet_slices

    cfg = MFLIModelConfig(dim=16, embedding_dim=16, hidden=[32], levels=2, codes=8)
    torch.manual_seed(0)
    model = build_mfli(cfg, torch.device("cpu"))
    items = pq.read_table(ml100k_dir / "items.parquet")
    # a new item: the content of item 1 (Toy Story) under an id the model has never seen
    new_id = 10**15 + 1
    new = items.slice(0, 1).set_column(0, items.schema.field(0), pa.array([new_id], pa.int64()))
    model.set_content(ItemContent.from_items(pa.concat_tables([items, new])))
    ids = pa.array([1, 2, 3, new_id], pa.int64())
    model.train()  # a training pass inserts the known ids into the MPZCH tables
    model(to_kjt(pa.table({"user_id": ids, "item_id": ids, "history": pa.array([[1]] * 4, pa.list_(pa.int64()))})))
    model.eval()
    set_mpzch_training(model, False)
    with torch.no_grad():
        _, item = model(to_kjt(pa.table({"item_id": ids}), present=["item_id"]))
    cols = facet_slices(cfg.dim)
    semantic, engagement = item[:, cols["semantic"]], item[:, cols["engagement"]]
    # same content → same semantic vector whatever the id; the engagement facet reads the id
    torch.testing.assert_close(semantic[3], semantic[0])
    assert not torch.allclose(engagement[3], engagement[0])
    assert not torch.allclose(semantic[1], semantic[0])  # different content

    # index items 1-3 in both facets, then add the new one through its content alone
    index = MFLIIndex({n: torch.randn(2, 8, 16) for n in ("engagement", "semantic")}, beam=8, depth=1)
    index.add_items(torch.tensor([1, 2, 3]), {"engagement": engagement[:3], "semantic": semantic[:3]})
    index.add_items(torch.tensor([new_id]), {"semantic": semantic[3:]})
    user = torch.cat([torch.zeros(1, 16), semantic[3:]], dim=1)
    result = index.search(user, 4, exclude=[torch.tensor([1])])
    assert int(result.item_ids[0, 0]) == new_id


def test_content_encoder_embeds_new_items_like_the_model_without_it(ml100k_dir, tmp_path):
    """The exported content path gives a catalogue item the model's own semantic vector, an
    engagement vector from content alone (a zero id row), survives save/load, and lets a brand-new
    item be retrieved through both facets; tokens the catalogue never had are skipped."""
    from embeddings.tables import set_mpzch_training
    from training.data.loader import to_kjt
    from training.index.content_encoder import ContentEncoder, export_content_encoder
    from training.models.item_content import ItemContent, content_tokens
    from training.models.mfli import MFLIModelConfig, build_mfli, facet_slices

    cfg = MFLIModelConfig(dim=16, embedding_dim=16, hidden=[32], levels=2, codes=8)
    torch.manual_seed(0)
    model = build_mfli(cfg, torch.device("cpu"))
    items = pq.read_table(ml100k_dir / "items.parquet").slice(0, 300)
    model.set_content(ItemContent.from_items(items))
    ids = items.column("item_id")
    model.train()  # a training pass inserts the ids and their content tokens
    model(to_kjt(pa.table({"user_id": ids, "item_id": ids, "history": pa.array([[1]] * len(ids), pa.list_(pa.int64()))})))
    model.eval()
    set_mpzch_training(model, False)
    with torch.no_grad():
        _, item = model(to_kjt(pa.table({"item_id": ids}), present=["item_id"]))
    cols = facet_slices(cfg.dim)

    encoder = export_content_encoder(model, items, chunk=64)
    encoder.save(tmp_path / "enc")
    loaded = ContentEncoder.load(tmp_path / "enc")
    for enc in (encoder, loaded):
        vectors = enc.encode(items)
        torch.testing.assert_close(vectors["semantic"], item[:, cols["semantic"]], atol=1e-5, rtol=1e-5)
        assert vectors["engagement"].shape == (300, 16)
        torch.testing.assert_close(vectors["engagement"].norm(dim=1), torch.ones(300))
    # the engagement facet from content alone is not the trained item's (its id row is missing)
    assert not torch.allclose(vectors["engagement"], item[:, cols["engagement"]], atol=1e-3)
    with torch.no_grad():  # it is the engagement MLP over [0 ‖ content]
        content = torch.cat([loaded._pool(n, w) for n, w in content_tokens(items.slice(0, 3)).items()], dim=1)
        expect = torch.nn.functional.normalize(model.item_mlps["engagement"](torch.cat([torch.zeros(3, 16), content], 1)), dim=-1)
    torch.testing.assert_close(loaded.encode(items.slice(0, 3))["engagement"], expect, atol=1e-5, rtol=1e-5)

    # a new item: Toy Story's content plus a word no item had, under an unseen id
    new_id = 10**15 + 7
    toy = items.slice(0, 1)
    new = toy.set_column(0, toy.schema.field(0), pa.array([new_id], pa.int64()))
    new = new.set_column(new.schema.get_field_index("title"), new.schema.field("title"), pa.array([toy.column("title")[0].as_py() + " zyxwv"]))
    fresh = loaded.encode(new)
    torch.testing.assert_close(fresh["semantic"], loaded.encode(toy)["semantic"])  # the unknown word is skipped
    index = MFLIIndex({n: torch.randn(2, 8, 16) for n in ("engagement", "semantic")}, beam=8, depth=1)
    index.add_items(torch.tensor(ids.to_numpy()[1:50]), {n: item[1:50, cols[n]] for n in ("engagement", "semantic")})
    index.add_items(torch.tensor([new_id]), fresh)
    user = torch.cat([fresh["engagement"], fresh["semantic"]], dim=1)
    assert int(index.search(user, 5).item_ids[0, 0]) == new_id


# ---------------------------------------------------------------- one tiny 2-worker training run


# ``tiny_mfli_run`` (tests/conftest.py): configs/tiny-mfli.yaml trained once per session.


def test_co_training_changes_codes_keeps_them_balanced_and_identical_on_ranks(tiny_mfli_run):
    records = list(tiny_mfli_run.read_metrics())
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["loss"] < records[0]["loss"]
    last = records[-1]
    for facet in ("engagement", "semantic"):
        assert last[f"mfli/{facet}/codes_changed"] > 0.05  # co-training moved items between codes
        hist = torch.tensor(last[f"mfli/{facet}/occupancy"])  # [L, K] items per code, logged per epoch
        assert hist.shape == (2, 16) and (hist.sum(1) == 1682).all()
        assert (hist.max(1).values < 0.3 * 1682).all()  # fair share is 1/16 = 6%
        assert (hist > 0).all()  # no dead code
    assert all(r["mfli/codebook_rank_drift"] == 0.0 for r in records)  # EMA identical on both ranks
    # the lookup scores a fraction of the catalogue and keeps most of exact search's recall
    assert last["valid_mfli/items_scored"] < 0.6 * 1682
    assert last["valid_mfli/recall@50"] >= 0.85 * last["valid/recall@50"] > 0.1


def test_run_folder_holds_the_index_and_checkpoints_hold_it_too(tiny_mfli_run):
    info = json.loads((tiny_mfli_run.index_dir / "index.json").read_text())
    assert info["model"] == "mfli" and info["dim"] == 64 and info["num_items"] == 1682
    index = MFLIIndex.load(tiny_mfli_run.index_dir / info["mfli_index"])
    assert len(index) == 1682 and [f.name for f in index.facets] == ["engagement", "semantic"]
    ckpt = tiny_mfli_run.checkpoints()[-1]
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    in_ckpt = MFLIIndex.load(ckpt / "mfli_index")
    assert len(in_ckpt) == 1682
    # serving's users.parquet (concatenated facets) drives the loaded index
    users = pq.read_table(tiny_mfli_run.index_dir / "users.parquet")
    user_emb = torch.tensor(users.column("embedding").to_pylist()[:8])
    result = index.search(user_emb, 10)
    assert (result.item_ids >= 0).all() and result.stats["items_scored"] < 8 * 1682
    test = json.loads(tiny_mfli_run.eval_path.read_text())
    assert 0 < test["test_mfli/recall@10"] <= test["test_mfli/recall@50"] <= 1
    # the content encoder cut out of the sharded model reproduces its semantic facet
    from training.index.content_encoder import ENCODER_DIR, ContentEncoder

    encoder = ContentEncoder.load(tiny_mfli_run.index_dir / info["mfli_index"] / ENCODER_DIR)
    catalogue = pq.read_table(f"{info['dataset']}/items.parquet")
    sample = catalogue.slice(0, 200)
    got = encoder.encode(sample)["semantic"]
    want = index.facet_vectors("semantic", torch.from_numpy(sample.column("item_id").to_numpy()))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mfli_configs_load_and_unknown_keys_are_named():
    from training.config import ConfigError, load_config
    from training.jobs.train_mfli import MFLIRunConfig

    for name in ("ml100k-mfli.yaml", "tiny-mfli.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert isinstance(cfg, MFLIRunConfig) and cfg.kind == "mfli"
    full = load_config(REPO / "configs" / "ml100k-mfli.yaml")
    assert (full.model.levels, full.model.codes) == (3, 64)
    with pytest.raises(ConfigError, match="model.codebook_size: unknown key"):
        load_config(REPO / "configs" / "tiny-mfli.yaml", ["model.codebook_size=3"])
