"""Tests for rayrec's MPZCH CPU kernel (embeddings/kernel.py): layout and arguments.

The oracle for layout is fbgemm itself: whatever rayrec inserts, fbgemm's readonly CPU kernel
must find at the slot rayrec returned. Eviction and admission: test_kernel_eviction.py; a
sequential model of the CUDA kernel and the op under tracing: test_kernel_model.py; the hash:
test_hashing.py.
"""

from __future__ import annotations

import time

import pytest
import torch

from embeddings.hashing import first_probe_slot, unsigned_mod
from embeddings.kernel import zero_collision_hash_insert
from tests.embeddings.hash_oracle import random_ids
from tests.embeddings.kernel_tables import buffers, fbgemm_lookup, insert, probe_window

INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# insert → fbgemm readonly parity, layout invariants


@pytest.mark.parametrize("load", [0.5, 0.95])
@pytest.mark.parametrize("max_probe", [4, 32])
def test_fbgemm_readonly_finds_every_inserted_id_where_rayrec_put_it(load: float, max_probe: int) -> None:
    rows = 4096
    ids = random_ids(int(rows * load), seed=3)
    identities, _ = buffers(rows)
    slots, evicted = insert(ids, identities, max_probe)
    assert evicted is None  # eviction off: fbgemm returns no evict_slots either

    stored = identities[slots, 0] == ids
    assert stored.float().mean() > 0.8
    # Every ID (inserted or fallen back) gets the same slot from fbgemm's readonly kernel.
    assert torch.equal(fbgemm_lookup(ids, identities, max_probe), slots)
    # IDs without their own row sit on their first probe slot, whose whole window is full.
    fallback = ~stored
    assert torch.equal(slots[fallback], first_probe_slot(ids[fallback], rows))
    for raw, start in zip(ids[fallback].tolist()[:50], first_probe_slot(ids[fallback], rows).tolist()[:50]):
        window = identities[probe_window(start, 0, rows, max_probe), 0]
        assert bool((window != -1).all()) and raw not in window.tolist()
    # No ID occupies two slots; every stored ID was in the batch.
    occupied = identities[identities[:, 0] != -1, 0]
    assert occupied.numel() == torch.unique(occupied).numel() == int(stored.sum())
    assert bool(torch.isin(occupied, ids).all())
    # A second pass over the same IDs changes nothing and returns the same slots.
    before = identities.clone()
    again, _ = insert(ids, identities, max_probe)
    assert torch.equal(again, slots) and torch.equal(identities, before)


def test_each_stored_id_sits_inside_its_own_window() -> None:
    rows, max_probe = 1024, 8
    ids = random_ids(900, seed=4)
    identities, _ = buffers(rows)
    insert(ids, identities, max_probe)
    slot_of = {raw: slot for slot, raw in enumerate(identities[:, 0].tolist()) if raw != -1}
    starts = dict(zip(ids.tolist(), first_probe_slot(ids, rows).tolist()))
    for raw, slot in slot_of.items():
        assert (slot - starts[raw]) % rows < max_probe
        # ...and every slot it skipped was already taken when it arrived, so still is.
        for skipped in probe_window(starts[raw], 0, rows, (slot - starts[raw]) % rows):
            assert identities[skipped, 0] != -1


def test_probing_never_leaves_its_bucket() -> None:
    buckets, bucket_rows, max_probe = 8, 64, 16
    rows = buckets * bucket_rows
    ids = random_ids(int(rows * 1.1), seed=5)  # overfull: windows wrap around their bucket
    bucket = unsigned_mod(ids, buckets)  # any bucket rule works for the kernel
    local_sizes = torch.full_like(ids, bucket_rows)
    offsets = bucket * bucket_rows
    identities, _ = buffers(rows)
    slots, _ = insert(ids, identities, max_probe, local_sizes=local_sizes, offsets=offsets)

    assert bool(((slots >= offsets) & (slots < offsets + bucket_rows)).all())
    for b in range(buckets):
        stored = identities[b * bucket_rows : (b + 1) * bucket_rows, 0]
        stored = stored[stored != -1]
        assert bool((unsigned_mod(stored, buckets) == b).all())
    lookup = fbgemm_lookup(ids, identities, max_probe, local_sizes=local_sizes, offsets=offsets)
    assert torch.equal(lookup, slots)
    fallback = identities[slots, 0] != ids
    assert fallback.any()
    assert torch.equal(slots[fallback], first_probe_slot(ids, rows, local_sizes, offsets)[fallback])


def test_full_table_without_eviction_falls_back_and_counts() -> None:
    rows = 64
    ids = random_ids(3 * rows, seed=6)
    identities, _ = buffers(rows)
    slots, _ = insert(ids, identities, max_probe=rows)  # a window spans the whole table
    stored = identities[slots, 0] == ids
    assert int(stored.sum()) == rows  # the first 64 distinct IDs own every row...
    assert bool(stored[:rows].all()) and not bool(stored[rows:].any())
    assert torch.equal(slots[rows:], first_probe_slot(ids[rows:], rows))  # ...the rest share
    assert bool((identities != -1).all())


def test_disable_fallback_returns_minus_one() -> None:
    rows = 32
    ids = random_ids(2 * rows, seed=7)
    identities, _ = buffers(rows)
    slots, _ = insert(ids, identities, max_probe=rows, disable_fallback=True)
    assert bool((slots[:rows] >= 0).all())
    assert bool((slots[rows:] == -1).all())
    lookup = fbgemm_lookup(ids, identities, rows, disable_fallback=True)
    assert torch.equal(lookup, slots)


def test_earlier_id_in_the_batch_wins_a_contested_slot() -> None:
    rows = 16
    ids = random_ids(200, seed=8)
    start = first_probe_slot(ids, rows)
    a, b = ids[start == 3][:2].tolist()  # two IDs that probe slot 3 first
    for order in ([a, b], [b, a]):
        identities, _ = buffers(rows)
        slots, _ = insert(torch.tensor(order), identities, max_probe=1)
        assert identities[3, 0] == order[0]
        assert slots.tolist() == [3, 3]  # the loser falls back onto the same first slot


def test_negative_ids_and_int32_tables() -> None:
    rows, max_probe = 512, 64
    ids = -torch.arange(2, 202, dtype=torch.int64) * 1_000_003  # all negative, load 0.4
    identities, _ = buffers(rows)
    slots, _ = insert(ids, identities, max_probe)
    assert bool((identities[slots, 0] == ids).all())
    assert torch.equal(fbgemm_lookup(ids, identities, max_probe), slots)

    # int32 identities store id % INT32_MAX (C remainder: the sign follows the ID).
    ids = torch.cat([random_ids(200, seed=9), ids])
    ids32, _ = torch.ops.fbgemm.create_zch_buffer(rows, support_evict=False, long_type=False)
    slots, _ = insert(ids, ids32, max_probe)
    assert ids32.dtype == torch.int32
    expected = torch.fmod(ids, INT32_MAX).to(torch.int32)
    stored = ids32[slots, 0] == expected
    assert stored.float().mean() > 0.95
    assert torch.equal(fbgemm_lookup(ids, ids32, max_probe), slots)


def test_empty_batch() -> None:
    identities, metadata = buffers(8, evict=True)
    empty = torch.empty(0, dtype=torch.int64)
    slots, evicted = insert(empty, identities, 4)
    assert slots.shape == (0,) and slots.dtype == torch.int64
    now = int(time.time() // 3600)
    slots, evicted = insert(
        empty, identities, 4, metadata=metadata, input_metadata=torch.empty(0, dtype=torch.int32),
        eviction_threshold=now,
    )
    assert slots.numel() == 0 and evicted is not None and evicted.numel() == 0
    assert bool((identities == -1).all())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(input=torch.tensor([1.0, 2.0])), "input must be int64 or int32"),
        (dict(identities=torch.full((8, 1), -1, dtype=torch.int16)), "identities must be int64 or int32"),
        (dict(identities=torch.full((8,), -1, dtype=torch.int64)), r"identities must have shape \[N, 1\]"),
        (dict(input=torch.tensor([1, 2], dtype=torch.int32)), "int32 input needs int32 identities"),
        (dict(circular_probe=False), "circular_probe must be true"),
        (dict(local_sizes=torch.tensor([8, 8], dtype=torch.int32), offsets=torch.zeros(2, dtype=torch.int64)), "local_sizes must be Long"),
        (dict(local_sizes=torch.tensor([8, 8]), offsets=torch.tensor([0, 4])), "outside a table of 8 rows"),
        (dict(metadata=torch.full((8, 1), -1, dtype=torch.int32)), "metadata must be None"),
        (dict(eviction_policy=2), "eviction_policy must be 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(change: dict, message: str) -> None:
    arguments = dict(
        input=torch.tensor([1, 2]), identities=torch.full((8, 1), -1, dtype=torch.int64),
        max_probe=4, circular_probe=True,
    )
    arguments.update(change)
    with pytest.raises(RuntimeError, match=message):
        zero_collision_hash_insert(**arguments)


def test_readonly_mode_equals_fbgemm_lookup() -> None:
    rows, max_probe = 256, 8
    ids = random_ids(300, seed=10)
    identities, _ = buffers(rows)
    insert(ids[:200], identities, max_probe)
    before = identities.clone()
    ours, evicted = zero_collision_hash_insert(ids, identities, max_probe, circular_probe=True, readonly=True)
    assert evicted is None and torch.equal(identities, before)
    assert torch.equal(ours, fbgemm_lookup(ids, identities, max_probe))
