"""Tests for rayrec's MPZCH CPU kernel (embeddings/kernel.py); its hash is tested in test_hashing.py.

The oracle for layout is fbgemm itself: whatever rayrec inserts, fbgemm's readonly CPU kernel
must find at the slot rayrec returned. Eviction and admission rules, which fbgemm cannot run on
CPU, are checked on hand-built tables whose outcome is known, and against a slow sequential
Python model of the CUDA kernel (``_model_insert``) on random small cases.
"""

from __future__ import annotations

import time

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import pytest
import torch
from hypothesis import given, settings, strategies as st

from embeddings.hashing import first_probe_slot, murmur_hash3, unsigned_mod
from embeddings.kernel import zero_collision_hash_insert
from tests.embeddings.hash_oracle import random_ids, reference_murmur

INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# helpers


def _buffers(rows: int, evict: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    identities, metadata = torch.ops.fbgemm.create_zch_buffer(rows, support_evict=evict, long_type=True)
    return identities, (metadata if evict else None)


def _insert(ids: torch.Tensor, identities: torch.Tensor, max_probe: int, **kwargs):
    return zero_collision_hash_insert(ids, identities, max_probe, circular_probe=True, **kwargs)


def _fbgemm_lookup(ids: torch.Tensor, identities: torch.Tensor, max_probe: int, **kwargs) -> torch.Tensor:
    slots, _ = torch.ops.fbgemm.zero_collision_hash(
        ids, identities, max_probe, circular_probe=True, readonly=True, **kwargs
    )
    return slots


def _window(start: int, offset: int, block: int, max_probe: int) -> list[int]:
    return [offset + (start + p) % block for p in range(max_probe)]


# --------------------------------------------------------------------------------------------
# insert → fbgemm readonly parity, layout invariants


@pytest.mark.parametrize("load", [0.5, 0.95])
@pytest.mark.parametrize("max_probe", [4, 32])
def test_fbgemm_readonly_finds_every_inserted_id_where_rayrec_put_it(load: float, max_probe: int) -> None:
    rows = 4096
    ids = random_ids(int(rows * load), seed=3)
    identities, _ = _buffers(rows)
    slots, evicted = _insert(ids, identities, max_probe)
    assert evicted is None  # eviction off: fbgemm returns no evict_slots either

    stored = identities[slots, 0] == ids
    assert stored.float().mean() > 0.8
    # Every ID (inserted or fallen back) gets the same slot from fbgemm's readonly kernel.
    assert torch.equal(_fbgemm_lookup(ids, identities, max_probe), slots)
    # IDs without their own row sit on their first probe slot, whose whole window is full.
    fallback = ~stored
    assert torch.equal(slots[fallback], first_probe_slot(ids[fallback], rows))
    for raw, start in zip(ids[fallback].tolist()[:50], first_probe_slot(ids[fallback], rows).tolist()[:50]):
        window = identities[_window(start, 0, rows, max_probe), 0]
        assert bool((window != -1).all()) and raw not in window.tolist()
    # No ID occupies two slots; every stored ID was in the batch.
    occupied = identities[identities[:, 0] != -1, 0]
    assert occupied.numel() == torch.unique(occupied).numel() == int(stored.sum())
    assert bool(torch.isin(occupied, ids).all())
    # A second pass over the same IDs changes nothing and returns the same slots.
    before = identities.clone()
    again, _ = _insert(ids, identities, max_probe)
    assert torch.equal(again, slots) and torch.equal(identities, before)


def test_each_stored_id_sits_inside_its_own_window() -> None:
    rows, max_probe = 1024, 8
    ids = random_ids(900, seed=4)
    identities, _ = _buffers(rows)
    _insert(ids, identities, max_probe)
    slot_of = {raw: slot for slot, raw in enumerate(identities[:, 0].tolist()) if raw != -1}
    starts = dict(zip(ids.tolist(), first_probe_slot(ids, rows).tolist()))
    for raw, slot in slot_of.items():
        assert (slot - starts[raw]) % rows < max_probe
        # ...and every slot it skipped was already taken when it arrived, so still is.
        for skipped in _window(starts[raw], 0, rows, (slot - starts[raw]) % rows):
            assert identities[skipped, 0] != -1


def test_probing_never_leaves_its_bucket() -> None:
    buckets, bucket_rows, max_probe = 8, 64, 16
    rows = buckets * bucket_rows
    ids = random_ids(int(rows * 1.1), seed=5)  # overfull: windows wrap around their bucket
    bucket = unsigned_mod(ids, buckets)  # any bucket rule works for the kernel
    local_sizes = torch.full_like(ids, bucket_rows)
    offsets = bucket * bucket_rows
    identities, _ = _buffers(rows)
    slots, _ = _insert(ids, identities, max_probe, local_sizes=local_sizes, offsets=offsets)

    assert bool(((slots >= offsets) & (slots < offsets + bucket_rows)).all())
    for b in range(buckets):
        stored = identities[b * bucket_rows : (b + 1) * bucket_rows, 0]
        stored = stored[stored != -1]
        assert bool((unsigned_mod(stored, buckets) == b).all())
    lookup = _fbgemm_lookup(ids, identities, max_probe, local_sizes=local_sizes, offsets=offsets)
    assert torch.equal(lookup, slots)
    fallback = identities[slots, 0] != ids
    assert fallback.any()
    assert torch.equal(slots[fallback], first_probe_slot(ids, rows, local_sizes, offsets)[fallback])


def test_full_table_without_eviction_falls_back_and_counts() -> None:
    rows = 64
    ids = random_ids(3 * rows, seed=6)
    identities, _ = _buffers(rows)
    slots, _ = _insert(ids, identities, max_probe=rows)  # a window spans the whole table
    stored = identities[slots, 0] == ids
    assert int(stored.sum()) == rows  # the first 64 distinct IDs own every row...
    assert bool(stored[:rows].all()) and not bool(stored[rows:].any())
    assert torch.equal(slots[rows:], first_probe_slot(ids[rows:], rows))  # ...the rest share
    assert bool((identities != -1).all())


def test_disable_fallback_returns_minus_one() -> None:
    rows = 32
    ids = random_ids(2 * rows, seed=7)
    identities, _ = _buffers(rows)
    slots, _ = _insert(ids, identities, max_probe=rows, disable_fallback=True)
    assert bool((slots[:rows] >= 0).all())
    assert bool((slots[rows:] == -1).all())
    lookup = _fbgemm_lookup(ids, identities, rows, disable_fallback=True)
    assert torch.equal(lookup, slots)


def test_earlier_id_in_the_batch_wins_a_contested_slot() -> None:
    rows = 16
    ids = random_ids(200, seed=8)
    start = first_probe_slot(ids, rows)
    a, b = ids[start == 3][:2].tolist()  # two IDs that probe slot 3 first
    for order in ([a, b], [b, a]):
        identities, _ = _buffers(rows)
        slots, _ = _insert(torch.tensor(order), identities, max_probe=1)
        assert identities[3, 0] == order[0]
        assert slots.tolist() == [3, 3]  # the loser falls back onto the same first slot


def test_negative_ids_and_int32_tables() -> None:
    rows, max_probe = 512, 64
    ids = -torch.arange(2, 202, dtype=torch.int64) * 1_000_003  # all negative, load 0.4
    identities, _ = _buffers(rows)
    slots, _ = _insert(ids, identities, max_probe)
    assert bool((identities[slots, 0] == ids).all())
    assert torch.equal(_fbgemm_lookup(ids, identities, max_probe), slots)

    # int32 identities store id % INT32_MAX (C remainder: the sign follows the ID).
    ids = torch.cat([random_ids(200, seed=9), ids])
    ids32, _ = torch.ops.fbgemm.create_zch_buffer(rows, support_evict=False, long_type=False)
    slots, _ = _insert(ids, ids32, max_probe)
    assert ids32.dtype == torch.int32
    expected = torch.fmod(ids, INT32_MAX).to(torch.int32)
    stored = ids32[slots, 0] == expected
    assert stored.float().mean() > 0.95
    assert torch.equal(_fbgemm_lookup(ids, ids32, max_probe), slots)


def test_empty_batch() -> None:
    identities, metadata = _buffers(8, evict=True)
    empty = torch.empty(0, dtype=torch.int64)
    slots, evicted = _insert(empty, identities, 4)
    assert slots.shape == (0,) and slots.dtype == torch.int64
    now = int(time.time() // 3600)
    slots, evicted = _insert(
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
    identities, _ = _buffers(rows)
    _insert(ids[:200], identities, max_probe)
    before = identities.clone()
    ours, evicted = zero_collision_hash_insert(ids, identities, max_probe, circular_probe=True, readonly=True)
    assert evicted is None and torch.equal(identities, before)
    assert torch.equal(ours, _fbgemm_lookup(ids, identities, max_probe))


# --------------------------------------------------------------------------------------------
# eviction


def _colliding_ids(rows: int, count: int, seed: int) -> torch.Tensor:
    """IDs whose first probe slot is 0, so with max_probe=rows they walk the table in order."""
    ids = random_ids(count * rows * 3, seed=seed)
    return ids[first_probe_slot(ids, rows) == 0][:count]


def test_ttl_eviction_retires_expired_ids_and_reports_their_slots() -> None:
    rows = 8
    now = 1000
    identities, metadata = _buffers(rows, evict=True)
    old = _colliding_ids(rows, 2 * rows, seed=11)
    first, second = old[:rows], old[rows:]
    ttl = lambda ids, hours: torch.full_like(ids, now + hours, dtype=torch.int32)  # noqa: E731

    slots, evicted = _insert(first, identities, rows, metadata=metadata,
                             input_metadata=ttl(first, 5), eviction_threshold=now)
    assert slots.tolist() == list(range(rows)) and evicted.numel() == 0
    assert metadata[:, 0].tolist() == [now + 5] * rows  # metadata holds the expiry hour

    # Not expired yet (threshold now+5 is not above expiry now+5): nothing moves, all fall back.
    slots, evicted = _insert(second, identities, rows, metadata=metadata,
                             input_metadata=ttl(second, 10), eviction_threshold=now + 5)
    assert evicted.numel() == 0 and slots.tolist() == [0] * rows
    assert torch.equal(identities[:, 0], first)

    # Six hours later the first IDs have expired: each new ID takes the first expired slot.
    slots, evicted = _insert(second, identities, rows, metadata=metadata,
                             input_metadata=ttl(second, 10), eviction_threshold=now + 6)
    assert slots.tolist() == list(range(rows))
    assert evicted.tolist() == list(range(rows))
    assert torch.equal(identities[:, 0], second)
    assert metadata[:, 0].tolist() == [now + 10] * rows
    assert torch.equal(_fbgemm_lookup(second, identities, rows), slots)


def test_per_feature_ttl_evicts_only_the_short_lived_feature() -> None:
    rows, now = 8, 2000
    identities, metadata = _buffers(rows, evict=True)
    ids = _colliding_ids(rows, rows + 4, seed=12)
    residents, newcomers = ids[:rows], ids[rows:]
    # Two features in one batch: even positions have TTL 2 h, odd positions TTL 48 h.
    expiry = torch.tensor([now + (2 if i % 2 == 0 else 48) for i in range(rows)], dtype=torch.int32)
    _insert(residents, identities, rows, metadata=metadata, input_metadata=expiry, eviction_threshold=now)

    later = now + 10
    slots, evicted = _insert(newcomers, identities, rows, metadata=metadata,
                             input_metadata=torch.full((4,), later + 2, dtype=torch.int32),
                             eviction_threshold=later)
    assert evicted.tolist() == [0, 2, 4, 6]  # the short-TTL rows, in probe order
    assert slots.tolist() == [0, 2, 4, 6]
    assert identities[[1, 3, 5, 7], 0].tolist() == residents[[1, 3, 5, 7]].tolist()


def test_ttl_eviction_keeps_a_present_id_and_refreshes_its_expiry() -> None:
    rows, now = 8, 3000
    identities, metadata = _buffers(rows, evict=True)
    ids = _colliding_ids(rows, rows, seed=13)
    _insert(ids, identities, rows, metadata=metadata,
            input_metadata=torch.full((rows,), now + 1, dtype=torch.int32), eviction_threshold=now)
    # Everything has expired, but the last ID is already in its window (slot 7): it must stay
    # there rather than evict slot 0, and its expiry moves forward.
    slots, evicted = _insert(ids[-1:], identities, rows, metadata=metadata,
                             input_metadata=torch.tensor([now + 50], dtype=torch.int32),
                             eviction_threshold=now + 10)
    assert slots.tolist() == [7] and evicted.numel() == 0
    assert metadata[7, 0] == now + 50 and metadata[0, 0] == now + 1


def test_eviction_never_lowers_metadata_or_admits_a_staler_id() -> None:
    """An incoming value below a slot's metadata neither evicts it nor lowers it."""
    rows, max_probe = 10, 2
    for policy in (0, 1):
        identities = torch.tensor([[10], [4], [8], [20000], [42], [14], [12], [26], [0], [6]])
        metadata = torch.tensor([[200], [14], [9], [491802], [20], [10], [2], [4], [103], [203]],
                                dtype=torch.int32)
        before = metadata.clone()
        ids = torch.tensor([10, 4, 8, 83, 42, 14, 12, 26, 0, 6])
        incoming = torch.tensor([2, 14, 9, 1, 20, 10, 2, 4, 103, 203], dtype=torch.int32)
        slots, evicted = _insert(ids, identities, max_probe, metadata=metadata, input_metadata=incoming,
                                 eviction_threshold=100, eviction_policy=policy, disable_fallback=True)
        assert 83 not in identities[:, 0].tolist()
        assert slots[3] == -1 and evicted.numel() == 0
        assert bool((metadata >= before).all()) and torch.equal(metadata, before)
        assert identities.shape[0] == rows


def test_lru_evicts_the_oldest_expired_slot_and_the_earliest_on_ties() -> None:
    rows, now = 8, 4000
    identities, metadata = _buffers(rows, evict=True)
    ids = _colliding_ids(rows, rows + 3, seed=14)
    residents = ids[:rows]
    last_seen = torch.tensor([now - 3, now - 9, now + 5, now - 9, now - 1, now + 9, now - 2, now - 4],
                             dtype=torch.int32)
    _insert(residents, identities, rows, metadata=metadata, input_metadata=last_seen,
            eviction_threshold=now - 100, eviction_policy=1)
    assert identities[:, 0].tolist() == residents.tolist()

    stamp = torch.tensor([now + 24], dtype=torch.int32)
    first_slots, evicted = _insert(ids[rows:rows + 1], identities, rows, metadata=metadata,
                                   input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert first_slots.tolist() == [1] and evicted.tolist() == [1]  # now-9 twice: slot 1 first
    second_slots, evicted = _insert(ids[rows + 1:rows + 2], identities, rows, metadata=metadata,
                                    input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert second_slots.tolist() == [3] and evicted.tolist() == [3]
    third, evicted = _insert(ids[rows + 2:], identities, rows, metadata=metadata,
                             input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert third.tolist() == [7] and evicted.tolist() == [7]  # now-4 is the oldest left
    assert metadata[[1, 3, 7], 0].tolist() == [now + 24] * 3
    assert torch.equal(_fbgemm_lookup(ids[rows:], identities, rows), torch.tensor([1, 3, 7]))

    # Nothing left below the threshold: the next newcomer falls back, nothing is evicted.
    metadata[:, 0] = now + 1
    more = _colliding_ids(rows, rows + 4, seed=14)[-1:]
    slots, evicted = _insert(more, identities, rows, metadata=metadata,
                             input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert slots.tolist() == [0] and evicted.numel() == 0 and more.item() not in identities


def test_lru_prefers_an_empty_slot_over_evicting() -> None:
    rows, now = 8, 5000
    identities, metadata = _buffers(rows, evict=True)
    ids = _colliding_ids(rows, 4, seed=15)
    _insert(ids[:3], identities, rows, metadata=metadata,
            input_metadata=torch.full((3,), now - 50, dtype=torch.int32),
            eviction_threshold=now - 100, eviction_policy=1)
    slots, evicted = _insert(ids[3:], identities, rows, metadata=metadata,
                             input_metadata=torch.tensor([now + 1], dtype=torch.int32),
                             eviction_threshold=now, eviction_policy=1)
    assert slots.tolist() == [3] and evicted.numel() == 0


# --------------------------------------------------------------------------------------------
# opt-in admission, frequency counters


def test_opt_in_sends_unlucky_new_ids_to_reserved_slots() -> None:
    rows, reserved, max_probe, now = 64, 4, 16, 6000
    block = rows - reserved
    identities, metadata = _buffers(rows, evict=True)
    ids = random_ids(40, seed=16)
    rands = torch.arange(40, dtype=torch.int32) * 5 % 100  # 0, 5, ..., 95, 0, ...
    admitted = rands < 50
    slots, evicted = _insert(ids, identities, max_probe, metadata=metadata,
                             input_metadata=torch.full((40,), now + 5, dtype=torch.int32),
                             eviction_threshold=now, opt_in_prob=50, num_reserved_slots=reserved,
                             opt_in_rands=rands)
    hashes = murmur_hash3(ids)
    assert torch.equal(slots[~admitted], block + unsigned_mod(hashes[~admitted], reserved))
    assert bool((slots[admitted] < block).all())
    assert bool((identities[slots[admitted], 0] == ids[admitted]).all())
    assert not bool(torch.isin(ids[~admitted], identities[:, 0]).any())  # never owned
    assert bool((identities[block:, 0] == -1).all())
    assert bool((metadata[slots[~admitted], 0] == now + 5).all())  # reserved rows still stamped
    lookup = _fbgemm_lookup(ids, identities, max_probe, opt_in_prob=50, num_reserved_slots=reserved)
    assert torch.equal(lookup, slots)

    # An already admitted ID keeps its row whatever its draw.
    again, _ = _insert(ids[admitted], identities, max_probe, metadata=metadata,
                       input_metadata=torch.full((int(admitted.sum()),), now + 6, dtype=torch.int32),
                       eviction_threshold=now, opt_in_prob=50, num_reserved_slots=reserved,
                       opt_in_rands=torch.full((int(admitted.sum()),), 99, dtype=torch.int32))
    assert torch.equal(again, slots[admitted])


def test_always_on_opt_in_probes_only_the_opt_in_block() -> None:
    rows, reserved = 40, 8
    identities, _ = _buffers(rows)
    ids = random_ids(80, seed=17)
    slots, _ = _insert(ids, identities, rows, opt_in_prob=100, num_reserved_slots=reserved)
    stored = identities[slots, 0] == ids
    assert int(stored.sum()) == rows - reserved
    assert bool((identities[rows - reserved:, 0] == -1).all())
    hashes = murmur_hash3(ids[~stored])
    assert torch.equal(slots[~stored], rows - reserved + unsigned_mod(hashes, reserved))


def test_runtime_meta_counts_hits_and_restarts_on_eviction() -> None:
    rows, now = 8, 7000
    identities, metadata = _buffers(rows, evict=True)
    counts = torch.zeros(rows, 1, dtype=torch.int64)
    ids = _colliding_ids(rows, rows + 1, seed=18)
    expiry = torch.full((rows,), now + 1, dtype=torch.int32)
    for _ in range(3):
        _insert(ids[:rows], identities, rows, metadata=metadata, input_metadata=expiry,
                eviction_threshold=now, runtime_meta=counts)
    assert counts[:, 0].tolist() == [3] * rows
    _insert(ids[rows:], identities, rows, metadata=metadata,
            input_metadata=torch.tensor([now + 9], dtype=torch.int32), eviction_threshold=now + 5,
            runtime_meta=counts)
    assert counts[:, 0].tolist() == [1] + [3] * (rows - 1)


# --------------------------------------------------------------------------------------------
# a sequential model of the CUDA kernel, against random small cases


def _model_insert(ids, identities, metadata, max_probe, sizes, offs, incoming, threshold, policy,
                  prob, reserved, rands, disable_fallback):
    """Plain-Python, one-ID-at-a-time reading of fbgemm's CUDA insert kernel (lists mutated)."""
    support_evict = metadata is not None
    out, evicted = [], []
    for i, raw in enumerate(ids):
        modulo, offset = sizes[i], offs[i]
        block = modulo - reserved if prob != -1 else modulo
        h = reference_murmur(raw)
        start, value = h % block, incoming[i]
        reserved_slot = block + h % reserved if prob != -1 else None
        window = _window(start, offset, block, max_probe)
        present = False
        for slot in window:
            if identities[slot] == -1:
                break
            if identities[slot] == raw:
                present = True
                break
        if not present and rands is not None and rands[i] >= prob:
            if support_evict:
                metadata[reserved_slot + offset] = max(metadata[reserved_slot + offset], value)
            out.append(reserved_slot + offset)
            continue
        claimed, lru = None, None
        for slot in window:
            if identities[slot] in (-1, raw):
                identities[slot] = raw
                if support_evict:
                    metadata[slot] = max(metadata[slot], value)
                claimed = slot
                break
            if support_evict:
                seen = metadata[slot]
                expired = threshold > seen and seen < value
                if policy == 0 and not present and expired:
                    identities[slot], metadata[slot] = raw, max(seen, value)
                    evicted.append(slot)
                    claimed = slot
                    break
                if policy == 1 and expired and (lru is None or seen < metadata[lru]):
                    lru = slot
        if claimed is None and lru is not None:
            identities[lru], metadata[lru] = raw, max(metadata[lru], value)
            evicted.append(lru)
            claimed = lru
        if claimed is None:
            if disable_fallback:
                claimed = -1
            else:
                claimed = (reserved_slot if prob != -1 else h % modulo) + offset
        out.append(claimed)
    return out, sorted(set(evicted))


@settings(max_examples=60, deadline=None, database=None)
@given(
    data=st.data(),
    policy=st.sampled_from([None, 0, 1]),
    buckets=st.sampled_from([1, 2, 4]),
    opt_in=st.sampled_from([None, 100, 60]),
    disable_fallback=st.booleans(),
)
def test_kernel_matches_a_sequential_model_on_random_tables(data, policy, buckets, opt_in, disable_fallback) -> None:
    bucket_rows = data.draw(st.integers(6, 12))
    rows = buckets * bucket_rows
    max_probe = data.draw(st.integers(1, bucket_rows + 2))
    pool = data.draw(st.lists(st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != -1), min_size=1, max_size=40))
    rounds = data.draw(st.integers(1, 3))
    reserved = 2 if opt_in is not None else -1
    prob = opt_in if opt_in is not None else -1

    identities = torch.full((rows, 1), -1, dtype=torch.int64)
    metadata = torch.full((rows, 1), -1, dtype=torch.int32) if policy is not None else None
    model_ids = identities[:, 0].tolist()
    model_meta = metadata[:, 0].tolist() if metadata is not None else None
    for hour in range(rounds):
        batch = data.draw(st.lists(st.sampled_from(pool), min_size=0, max_size=30))
        ids = torch.tensor(batch, dtype=torch.int64)
        bucket = unsigned_mod(ids, buckets)
        sizes, offs = [bucket_rows] * len(batch), (bucket * bucket_rows).tolist()
        incoming = data.draw(st.lists(st.integers(0, 40), min_size=len(batch), max_size=len(batch)))
        threshold = data.draw(st.integers(1, 30)) if policy is not None else -1
        rands = (data.draw(st.lists(st.integers(0, 99), min_size=len(batch), max_size=len(batch)))
                 if prob not in (-1, 100) else None)
        kwargs = dict(
            local_sizes=torch.tensor(sizes, dtype=torch.int64), offsets=torch.tensor(offs, dtype=torch.int64),
            disable_fallback=disable_fallback, opt_in_prob=prob, num_reserved_slots=reserved,
            opt_in_rands=torch.tensor(rands, dtype=torch.int32) if rands is not None else None,
        )
        if policy is not None:
            kwargs.update(metadata=metadata, input_metadata=torch.tensor(incoming, dtype=torch.int32),
                          eviction_threshold=threshold, eviction_policy=policy)
        slots, evicted = _insert(ids, identities, max_probe, **kwargs)
        expected, expected_evicted = _model_insert(
            batch, model_ids, model_meta, max_probe, sizes, offs, incoming, threshold,
            policy if policy is not None else 0, prob, reserved if prob != -1 else 1, rands, disable_fallback,
        )
        assert slots.tolist() == expected
        assert identities[:, 0].tolist() == model_ids
        if policy is not None:
            assert metadata[:, 0].tolist() == model_meta
            assert evicted.tolist() == expected_evicted
        else:
            assert evicted is None
        occupied = identities[identities[:, 0] != -1, 0]
        assert occupied.numel() == torch.unique(occupied).numel()


# --------------------------------------------------------------------------------------------
# the custom op under tracing and compilation


def test_op_passes_opcheck_with_and_without_eviction() -> None:
    op = torch.ops.rayrec.zero_collision_hash.default
    ids = random_ids(64, seed=19)
    identities, _ = _buffers(128)
    torch.library.opcheck(op, (ids, identities, 8), dict(circular_probe=True))
    identities, metadata = _buffers(128, evict=True)
    torch.library.opcheck(
        op, (ids, identities, 8),
        dict(circular_probe=True, metadata=metadata, eviction_threshold=10, eviction_policy=1,
             input_metadata=torch.full((ids.numel(),), 20, dtype=torch.int32)),
    )


def test_op_under_fx_trace_and_torch_compile() -> None:
    def remap(ids: torch.Tensor, identities: torch.Tensor) -> torch.Tensor:
        slots, _ = zero_collision_hash_insert(ids, identities, 8, circular_probe=True)
        return slots + 1

    ids = random_ids(50, seed=20)
    eager_table, _ = _buffers(100)
    expected = remap(ids, eager_table)

    graph = torch.fx.symbolic_trace(remap)
    assert "rayrec.zero_collision_hash" in graph.code
    traced_table, _ = _buffers(100)
    assert torch.equal(graph(ids, traced_table), expected)
    assert torch.equal(traced_table, eager_table)

    compiled = torch.compile(remap, backend="aot_eager", fullgraph=True)
    compiled_table, _ = _buffers(100)
    assert torch.equal(compiled(ids, compiled_table), expected)
    assert torch.equal(compiled_table, eager_table)  # the in-place write survives functionalization


def test_library_build_is_cached_and_keyed_by_source(tmp_path) -> None:
    from embeddings.csrc import build

    cached = build.library_path()
    assert cached.exists()  # importing embeddings.kernel built (or found) it
    built_at = cached.stat().st_mtime_ns
    assert build.build() == cached
    assert cached.stat().st_mtime_ns == built_at  # found, not recompiled
    changed = tmp_path / "zch_insert.cpp"
    changed.write_text(build.SOURCE.read_text() + "\n// changed\n")
    assert build.library_path(changed) != cached
