"""MPZCH tables: inserts on CPU, eviction resets rows from the table's own initialisation
(unsharded and row-wise sharded over 2 gloo ranks), checkpoints reshard 1 → 2 with identical
lookups, counters, and bad input. (Counters against a full recount: test_stats.py.)"""

from __future__ import annotations

import os
import time
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import TableSpec, build_tables, mpzch_modules, set_mpzch_training
from tests.process_group import join_group, leave_group


def kjt(ids: list[int], key: str = "item_id") -> KeyedJaggedTensor:
    values = torch.tensor(ids, dtype=torch.int64)
    return KeyedJaggedTensor(keys=[key], values=values, lengths=torch.ones(len(ids), dtype=torch.int32))


def expire_all(model: torch.nn.Module) -> None:
    """Time travel: every resident id's expiry hour is set in the past."""
    past = int(time.time() // 3600) - 5
    for module in mpzch_modules(model).values():
        resident = module._hash_zch_identities != -1
        module._hash_zch_metadata[resident] = past


def small_spec(**overrides) -> TableSpec:
    args = dict(name="item", features=["item_id"], cardinality=8, dim=4, rows=16, buckets=2,
                max_probe=4, eviction="lru", ttl_hours=1)
    args.update(overrides)
    return TableSpec(**args)


def test_every_id_gets_its_own_row_and_lookups_agree_with_fbgemm():
    tables = build_tables([small_spec(rows=64, eviction="none")], torch.device("cpu"))
    ids = [5, 2**40 + 3, -7, 123456789]
    out, _ = tables(kjt(ids))
    module = mpzch_modules(tables)["item"]
    identities = module._hash_zch_identities.view(-1)
    assert sorted(identities[identities != -1].tolist()) == sorted(ids)
    train_rows = out["item_id"].values()
    tables.eval()
    set_mpzch_training(tables, False)
    eval_rows = tables(kjt(ids))[0]["item_id"].values()  # fbgemm's readonly kernel
    torch.testing.assert_close(train_rows, eval_rows)
    stats = module.table_stats().snapshot()
    assert stats["mpzch/item/inserts"] == 4 and stats["mpzch/item/fallbacks"] == 0


def test_unsharded_eviction_resets_row_and_optimizer_state():
    torch.manual_seed(0)
    tables = build_tables([small_spec()], torch.device("cpu"))
    apply_optimizer_in_backward(torch.optim.Adagrad, [p for p in tables.parameters() if p.requires_grad], {"lr": 0.5})
    weight = tables._embedding_module.embeddings["item"].weight
    old_ids = list(range(100, 116))
    tables(kjt(old_ids))[0]["item_id"].values().pow(2).sum().backward()  # rows move, state fills
    module = mpzch_modules(tables)["item"]
    before = weight.detach().clone()
    state = weight._in_backward_optimizers[0].state[weight]["sum"]
    assert float(state.abs().sum()) > 0
    occupied_before = module._hash_zch_identities.view(-1).clone()
    expire_all(tables)
    out, _ = tables(kjt(list(range(200, 216))))
    identities = module._hash_zch_identities.view(-1)
    reassigned = torch.nonzero((occupied_before != -1) & (identities != occupied_before)).view(-1)
    assert reassigned.numel() > 0
    bound = (1.0 / 16) ** 0.5
    assert not torch.isclose(weight[reassigned], before[reassigned]).all(dim=1).any()
    assert float(weight[reassigned].abs().max()) <= bound
    assert float(state[reassigned].abs().sum()) == 0.0
    kept = torch.nonzero(identities == occupied_before).view(-1)
    torch.testing.assert_close(weight[kept], before[kept])
    stats = module.table_stats().snapshot()
    assert stats["mpzch/item/evictions"] == reassigned.numel()
    # expired 5 hours ago with a 1 hour TTL: last seen 6 hours ago
    assert stats["mpzch/item/eviction_age_hours_sum"] == pytest.approx(6.0 * reassigned.numel())


TAG_INIT = 0.0625  # a custom init_fn's constant: a reset row must come back as exactly this


def tag_spec(**overrides) -> TableSpec:
    """A table with its own init_fn (constant), which eviction must reuse."""
    return small_spec(name="tag", features=["tag_id"], init_fn=partial(torch.nn.init.constant_, val=TAG_INIT), **overrides)


def test_unsharded_eviction_redraws_rows_with_the_table_init_fn():
    tables = build_tables([tag_spec()], torch.device("cpu"))
    apply_optimizer_in_backward(torch.optim.Adagrad, [p for p in tables.parameters() if p.requires_grad], {"lr": 0.5})
    weight = tables._embedding_module.embeddings["tag"].weight
    assert bool((weight == TAG_INIT).all())
    tables(kjt(list(range(100, 116)), key="tag_id"))[0]["tag_id"].values().pow(2).sum().backward()
    module = mpzch_modules(tables)["tag"]
    occupied_before = module._hash_zch_identities.view(-1).clone()
    assert not bool((weight[occupied_before != -1] == TAG_INIT).any())  # trained rows moved
    expire_all(tables)
    tables(kjt(list(range(200, 216)), key="tag_id"))
    reassigned = (occupied_before != -1) & (module._hash_zch_identities.view(-1) != occupied_before)
    assert int(reassigned.sum()) > 0
    assert bool((weight[reassigned] == TAG_INIT).all())


def two_table_kjt(ids: list[int]) -> KeyedJaggedTensor:
    values = torch.tensor(ids + ids, dtype=torch.int64)
    return KeyedJaggedTensor(keys=["item_id", "tag_id"], values=values, lengths=torch.ones(2 * len(ids), dtype=torch.int32))


def _sharded_eviction_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    join_group(rank, world, store)
    from embeddings.sharding import combined_optimizer, shard_model

    # "item": TorchRec's default init over the global 16 rows (each rank holds 8); wide rows so
    # that a redraw from the local row count (sqrt(2) wider) would show. "tag": its own init_fn.
    specs = [small_spec(dim=64), tag_spec(dim=64)]

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = build_tables(specs, torch.device("meta"))

        def forward(self, features):
            out = self.tables(features)[0]
            return torch.cat([out["item_id"].values().flatten(), out["tag_id"].values().flatten()])

    model = shard_model(Model(), specs, torch.device("cpu"), optimizer="rowwise_adagrad", lr=0.5)
    optimizer = combined_optimizer(model, 0.1)
    model(two_table_kjt(list(range(100, 116)))).pow(2).sum().backward()
    optimizer.step()
    views, result = {}, {}
    for table in ("item", "tag"):
        tbe, index = model.module.tables._table_to_tbe_and_index[table]
        views[table] = (tbe.split_embedding_weights()[int(index)], tbe.split_optimizer_states()[int(index)][0],
                        mpzch_modules(model)[table])
        weight, momentum, module = views[table]
        result[table] = {
            "ids_before": module._hash_zch_identities.view(-1).clone(),
            "weight_before": weight.clone(),
            "momentum_before": momentum.clone(),
        }
    expire_all(model)
    model(two_table_kjt(list(range(200, 216))))
    for table, (weight, momentum, module) in views.items():
        result[table].update(
            ids_after=module._hash_zch_identities.view(-1).clone(),
            weight_after=weight.clone(),
            momentum_after=momentum.clone(),
            evictions=module.table_stats().snapshot()[f"mpzch/{table}/evictions"],
        )
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank leaves while another still talks to it
    leave_group()


def test_sharded_eviction_resets_row_and_momentum_from_the_table_init_on_cpu(tmp_path):
    mp.spawn(_sharded_eviction_worker, args=(2, str(tmp_path / "pg-store"), str(tmp_path)), nprocs=2)
    total = {"item": 0, "tag": 0}
    redrawn = []
    for rank in range(2):
        for table, r in torch.load(tmp_path / f"rank{rank}.pt").items():
            reassigned = (r["ids_before"] != -1) & (r["ids_after"] != r["ids_before"])
            total[table] += int(reassigned.sum())
            assert float(r["momentum_before"][reassigned].abs().min()) > 0
            assert float(r["momentum_after"][reassigned].abs().sum()) == 0.0
            assert not torch.isclose(r["weight_after"][reassigned], r["weight_before"][reassigned]).all(dim=1).any()
            kept = r["ids_after"] == r["ids_before"]
            torch.testing.assert_close(r["weight_after"][kept], r["weight_before"][kept])
            assert r["evictions"] == int(reassigned.sum())
            if table == "tag":
                assert bool((r["weight_after"][reassigned] == TAG_INIT).all())
                assert bool((r["weight_after"][r["ids_after"] == -1] == TAG_INIT).all())  # as sharded
            else:
                redrawn.append(r["weight_after"][reassigned].flatten())
    assert total["item"] > 0 and total["tag"] > 0
    # Uniform in ±sqrt(1/16) = ±0.25 (the global table's rows), not ±sqrt(1/8) (this rank's): with
    # 64 values a row, a draw from the wider range would exceed 0.25 in nearly every row.
    redrawn = torch.cat(redrawn)
    assert float(redrawn.abs().max()) <= 0.25
    assert float(redrawn.abs().max()) > 0.2 and float(redrawn.std()) == pytest.approx(0.25 / 3**0.5, rel=0.25)


def _reshard_worker(rank: int, world: int, store: str, ckpt: str, out: str, save: bool) -> None:
    join_group(rank, world, store)
    from embeddings.sharding import combined_optimizer, shard_model
    from training.checkpoint import load_checkpoint, save_checkpoint

    spec = small_spec(rows=64, eviction="ttl", ttl_hours=24)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = build_tables([spec], torch.device("meta"))

        def forward(self, features):
            return self.tables(features)[0]["item_id"].values()

    torch.manual_seed(rank)
    model = shard_model(Model(), [spec], torch.device("cpu"))
    optimizer = combined_optimizer(model, 0.1)
    ids = [3, 2**50 + 1, 77, -9, 1000, 31, 12, 2**33]
    if save:
        model(kjt(ids)).pow(2).sum().backward()
        optimizer.step()
        save_checkpoint(model, optimizer, {"epoch": 0}, ckpt)
    else:
        load_checkpoint(model, optimizer, ckpt)
    model.eval()
    set_mpzch_training(model, False)
    rows = model(kjt(ids))
    module = mpzch_modules(model)["item"]
    resident = module._hash_zch_identities.view(-1)
    gathered = [None] * world
    dist.all_gather_object(gathered, sorted(resident[resident != -1].tolist()))
    if rank == 0:
        torch.save({"rows": rows, "identities": sorted(sum(gathered, []))}, out)
    dist.barrier()  # no rank leaves while another still talks to it
    leave_group()


@pytest.mark.parametrize("save_world,load_world", [(1, 2), (2, 1)])
def test_checkpoint_reshards_with_identical_lookups(tmp_path, save_world, load_world):
    ckpt = str(tmp_path / "ckpt")
    mp.spawn(_reshard_worker, args=(save_world, str(tmp_path / "pg-save"), ckpt, str(tmp_path / "a.pt"), True), nprocs=save_world)
    mp.spawn(_reshard_worker, args=(load_world, str(tmp_path / "pg-load"), ckpt, str(tmp_path / "b.pt"), False), nprocs=load_world)
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a["identities"] == b["identities"] and len(a["identities"]) == 8
    torch.testing.assert_close(a["rows"], b["rows"])


def test_full_table_without_eviction_counts_fallbacks_and_does_not_crash():
    tables = build_tables([small_spec(eviction="none")], torch.device("cpu"))
    out, _ = tables(kjt(list(range(1000, 1100))))  # 100 ids, 16 rows
    assert out["item_id"].values().shape == (100, 4)
    stats = mpzch_modules(tables)["item"].table_stats().snapshot()
    assert stats["mpzch/item/inserts"] == 16
    assert stats["mpzch/item/fallbacks"] == 84
    assert stats["mpzch/item/occupancy"] == 1.0


def test_empty_batch_and_negative_ids():
    tables = build_tables([small_spec(rows=64, eviction="none")], torch.device("cpu"))
    empty = KeyedJaggedTensor(keys=["item_id"], values=torch.empty(0, dtype=torch.int64), lengths=torch.zeros(3, dtype=torch.int32))
    assert tables(empty)[0]["item_id"].values().shape == (0, 4)
    out, _ = tables(kjt([-1, -2, -(2**63)]))
    identities = mpzch_modules(tables)["item"]._hash_zch_identities.view(-1)
    assert {-2, -(2**63)} <= set(identities.tolist())


def test_table_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="cardinality and dim must be positive"):
        TableSpec(name="t", features=["f"], cardinality=0, dim=4)
    with pytest.raises(ValueError, match="eviction must be"):
        TableSpec(name="t", features=["f"], cardinality=10, dim=4, eviction="fifo")
    from embeddings.tables import check_world_size

    with pytest.raises(ValueError, match="multiple of the world size 3"):
        check_world_size([TableSpec(name="t", features=["f"], cardinality=10, dim=4)], 3)


def test_pinned_clock_ages_ids_by_the_data_hour_and_survives_sharding_rebuild():
    """clock_hour replaces the wall clock: ids stamped at hour H expire once the clock passes H + TTL."""
    hour = 480_000  # decades before the wall clock: a wall-clock scorer would expire everything at once
    spec = small_spec(rows=16, buckets=1, max_probe=16, eviction="ttl", ttl_hours=24, clock_hour=hour)
    tables = build_tables([spec], torch.device("cpu"))
    module = mpzch_modules(tables)["item"]
    first = list(range(100, 116))  # fills the table
    tables(kjt(first))
    resident = module._hash_zch_identities != -1
    assert int(resident.sum()) == 16
    assert set(module._hash_zch_metadata[resident].tolist()) == {hour + 24}
    module.clock_hour = hour + 24  # one day later: not yet expired (the kernel evicts below the clock)
    tables(kjt([999]))
    assert 999 not in module._hash_zch_identities.view(-1).tolist()
    module.clock_hour = hour + 25  # TTL passed: the newcomer takes a stale row
    tables(kjt([999]))
    assert 999 in module._hash_zch_identities.view(-1).tolist()
    assert module.table_stats().snapshot()["mpzch/item/evictions"] == 1
    rebuilt = module.rebuild_with_output_id_range((0, 16), device=torch.device("cpu"))
    assert rebuilt.clock_hour == hour + 25
