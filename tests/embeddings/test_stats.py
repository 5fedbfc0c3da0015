"""MPZCH table counters (embeddings/stats.py): kept incrementally from the kernel's report, they
equal a full recount of the table after every call, evictions included; and a steady-state call
runs no torch op over a whole-table tensor besides the insert kernel itself."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchrec.sparse.jagged_tensor import JaggedTensor

from embeddings.mpzch import MPZCHModule
from embeddings.tables import TableSpec, build_mpzch_module

TTL = 2


def spec(eviction: str, rows: int = 64) -> TableSpec:
    return TableSpec(name="item", features=["item_id"], cardinality=rows // 2, dim=4, rows=rows,
                     buckets=2, max_probe=8, eviction=eviction, ttl_hours=TTL)


def features(ids: list[int]) -> dict[str, JaggedTensor]:
    values = torch.tensor(ids, dtype=torch.int64)
    return {"item_id": JaggedTensor(values=values, lengths=torch.ones(len(ids), dtype=torch.int32))}


@dataclass
class FullRecount:
    """The counters as the module kept them before issue #26 (the oracle): from copies of the
    whole table taken before and after each call."""

    ids: int = 0
    hits: int = 0
    inserts: int = 0
    fallbacks: int = 0
    evictions: int = 0
    eviction_age_hours_sum: float = 0.0
    occupancy: float = 0.0

    def call(self, module: MPZCHModule, ids: list[int]) -> None:
        identities = module._hash_zch_identities.view(-1)
        before = identities.clone()
        metadata = module._hash_zch_metadata
        expiry_before = None if metadata is None else metadata.view(-1).clone()
        hour = int(time.time() // 3600)  # the eviction threshold TorchRec's scorer passes
        slots = module(features(ids))["item_id"].values()
        evicted = module.evict()
        evicted = torch.empty(0, dtype=torch.int64) if evicted is None else evicted
        values = torch.tensor(ids, dtype=torch.int64)
        resolved = int((identities[slots] == values).sum())
        inserts = int((before == -1).sum()) - int((identities == -1).sum()) + evicted.numel()
        self.ids += len(ids)
        self.inserts += inserts
        self.hits += max(resolved - inserts, 0)
        self.fallbacks += len(ids) - resolved
        self.evictions += evicted.numel()
        if evicted.numel():
            self.eviction_age_hours_sum += float((hour - expiry_before[evicted] + TTL).sum())
        self.occupancy = int((identities != -1).sum()) / identities.numel()

    def metrics(self) -> dict[str, float]:
        return {f"mpzch/item/{k}": v for k, v in vars(self).items()}


def expire_every_other_row(module: MPZCHModule) -> None:
    """Time travel: half the resident ids were last seen 5 hours ago (past their 2-hour TTL)."""
    resident = torch.nonzero(module._hash_zch_identities.view(-1) != -1).view(-1)[::2]
    module._hash_zch_metadata.view(-1)[resident] = int(time.time() // 3600) - 5 + TTL


@pytest.mark.parametrize("eviction", ["none", "ttl", "lru"])
def test_incremental_counters_equal_a_full_recount_after_every_call(eviction: str) -> None:
    module = build_mpzch_module(spec(eviction), torch.device("cpu"))
    oracle = FullRecount()
    stats = module.table_stats()
    batches = [
        list(range(40)) + [3, 3, 7],       # inserts, repeats inside the batch
        list(range(20, 80)),                # hits, inserts, and fallbacks: 80 ids > 64 rows
        list(range(100, 140)) + [25, 26],   # after half the rows expire: evictions
        list(range(100, 120)) + [5000],     # hits on the rows just taken over
    ]
    for number, ids in enumerate(batches):
        if number == 2 and eviction != "none":
            expire_every_other_row(module)
        oracle.call(module, ids)
        assert stats.snapshot(reset=False) == pytest.approx(oracle.metrics()), f"after batch {number}"

    # The table replaced from outside the kernel (a checkpoint load): occupancy follows it.
    other = build_mpzch_module(spec(eviction), torch.device("cpu"))
    other(features(list(range(9000, 9010))))
    other.evict()
    module.load_state_dict(other.state_dict())
    oracle.call(module, list(range(9005, 9030)))
    assert stats.snapshot(reset=False) == pytest.approx(oracle.metrics())
    assert stats.occupied == int((module._hash_zch_identities != -1).sum()) == 30

    # The sequence exercised every counter (else the equalities above prove little).
    assert oracle.hits > 0 and oracle.fallbacks > 0 and oracle.inserts > 0
    if eviction != "none":
        assert oracle.evictions > 0 and oracle.eviction_age_hours_sum == 5.0 * oracle.evictions
    stats.snapshot()  # resets the per-step counters, keeps occupancy
    assert stats.snapshot()["mpzch/item/ids"] == 0
    assert stats.snapshot()["mpzch/item/occupancy"] == pytest.approx(30 / 64)


class WholeTableOps(TorchDispatchMode):
    """Records every aten op that reads or writes a tensor of at least ``rows`` elements."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows = rows
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        if any(t.numel() >= self.rows for t in tensors):
            self.ops.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("eviction", ["none", "ttl"])
def test_a_steady_state_call_runs_no_whole_table_op_but_the_kernel(eviction: str) -> None:
    rows = 1 << 16
    module = build_mpzch_module(spec(eviction, rows=rows), torch.device("cpu"))
    module(features(list(range(500))))  # the first call counts the table once
    module.evict()
    with WholeTableOps(rows) as seen:
        module(features(list(range(250, 750))))
        module.evict()
    assert seen.ops == ["rayrec.zero_collision_hash.default"]
