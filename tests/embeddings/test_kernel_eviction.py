"""MPZCH CPU kernel: eviction (TTL, LRU) and opt-in admission, which fbgemm cannot run on CPU,
checked on hand-built tables whose outcome is known.
"""

from __future__ import annotations

import torch

from embeddings.hashing import murmur_hash3, unsigned_mod
from tests.embeddings.hash_oracle import random_ids
from tests.embeddings.kernel_tables import buffers, colliding_ids, fbgemm_lookup, insert


# --------------------------------------------------------------------------------------------
# eviction


def test_ttl_eviction_retires_expired_ids_and_reports_their_slots() -> None:
    rows = 8
    now = 1000
    identities, metadata = buffers(rows, evict=True)
    old = colliding_ids(rows, 2 * rows, seed=11)
    first, second = old[:rows], old[rows:]
    ttl = lambda ids, hours: torch.full_like(ids, now + hours, dtype=torch.int32)  # noqa: E731

    slots, evicted = insert(first, identities, rows, metadata=metadata,
                            input_metadata=ttl(first, 5), eviction_threshold=now)
    assert slots.tolist() == list(range(rows)) and evicted.numel() == 0
    assert metadata[:, 0].tolist() == [now + 5] * rows  # metadata holds the expiry hour

    # Not expired yet (threshold now+5 is not above expiry now+5): nothing moves, all fall back.
    slots, evicted = insert(second, identities, rows, metadata=metadata,
                            input_metadata=ttl(second, 10), eviction_threshold=now + 5)
    assert evicted.numel() == 0 and slots.tolist() == [0] * rows
    assert torch.equal(identities[:, 0], first)

    # Six hours later the first IDs have expired: each new ID takes the first expired slot.
    slots, evicted = insert(second, identities, rows, metadata=metadata,
                            input_metadata=ttl(second, 10), eviction_threshold=now + 6)
    assert slots.tolist() == list(range(rows))
    assert evicted.tolist() == list(range(rows))
    assert torch.equal(identities[:, 0], second)
    assert metadata[:, 0].tolist() == [now + 10] * rows
    assert torch.equal(fbgemm_lookup(second, identities, rows), slots)


def test_per_feature_ttl_evicts_only_the_short_lived_feature() -> None:
    rows, now = 8, 2000
    identities, metadata = buffers(rows, evict=True)
    ids = colliding_ids(rows, rows + 4, seed=12)
    residents, newcomers = ids[:rows], ids[rows:]
    # Two features in one batch: even positions have TTL 2 h, odd positions TTL 48 h.
    expiry = torch.tensor([now + (2 if i % 2 == 0 else 48) for i in range(rows)], dtype=torch.int32)
    insert(residents, identities, rows, metadata=metadata, input_metadata=expiry, eviction_threshold=now)

    later = now + 10
    slots, evicted = insert(newcomers, identities, rows, metadata=metadata,
                            input_metadata=torch.full((4,), later + 2, dtype=torch.int32),
                            eviction_threshold=later)
    assert evicted.tolist() == [0, 2, 4, 6]  # the short-TTL rows, in probe order
    assert slots.tolist() == [0, 2, 4, 6]
    assert identities[[1, 3, 5, 7], 0].tolist() == residents[[1, 3, 5, 7]].tolist()


def test_ttl_eviction_keeps_a_present_id_and_refreshes_its_expiry() -> None:
    rows, now = 8, 3000
    identities, metadata = buffers(rows, evict=True)
    ids = colliding_ids(rows, rows, seed=13)
    insert(ids, identities, rows, metadata=metadata,
           input_metadata=torch.full((rows,), now + 1, dtype=torch.int32), eviction_threshold=now)
    # Everything has expired, but the last ID is already in its window (slot 7): it must stay
    # there rather than evict slot 0, and its expiry moves forward.
    slots, evicted = insert(ids[-1:], identities, rows, metadata=metadata,
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
        slots, evicted = insert(ids, identities, max_probe, metadata=metadata, input_metadata=incoming,
                                eviction_threshold=100, eviction_policy=policy, disable_fallback=True)
        assert 83 not in identities[:, 0].tolist()
        assert slots[3] == -1 and evicted.numel() == 0
        assert bool((metadata >= before).all()) and torch.equal(metadata, before)
        assert identities.shape[0] == rows


def test_lru_evicts_the_oldest_expired_slot_and_the_earliest_on_ties() -> None:
    rows, now = 8, 4000
    identities, metadata = buffers(rows, evict=True)
    ids = colliding_ids(rows, rows + 3, seed=14)
    residents = ids[:rows]
    last_seen = torch.tensor([now - 3, now - 9, now + 5, now - 9, now - 1, now + 9, now - 2, now - 4],
                             dtype=torch.int32)
    insert(residents, identities, rows, metadata=metadata, input_metadata=last_seen,
           eviction_threshold=now - 100, eviction_policy=1)
    assert identities[:, 0].tolist() == residents.tolist()

    stamp = torch.tensor([now + 24], dtype=torch.int32)
    first_slots, evicted = insert(ids[rows:rows + 1], identities, rows, metadata=metadata,
                                  input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert first_slots.tolist() == [1] and evicted.tolist() == [1]  # now-9 twice: slot 1 first
    second_slots, evicted = insert(ids[rows + 1:rows + 2], identities, rows, metadata=metadata,
                                   input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert second_slots.tolist() == [3] and evicted.tolist() == [3]
    third, evicted = insert(ids[rows + 2:], identities, rows, metadata=metadata,
                            input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert third.tolist() == [7] and evicted.tolist() == [7]  # now-4 is the oldest left
    assert metadata[[1, 3, 7], 0].tolist() == [now + 24] * 3
    assert torch.equal(fbgemm_lookup(ids[rows:], identities, rows), torch.tensor([1, 3, 7]))

    # Nothing left below the threshold: the next newcomer falls back, nothing is evicted.
    metadata[:, 0] = now + 1
    more = colliding_ids(rows, rows + 4, seed=14)[-1:]
    slots, evicted = insert(more, identities, rows, metadata=metadata,
                            input_metadata=stamp, eviction_threshold=now, eviction_policy=1)
    assert slots.tolist() == [0] and evicted.numel() == 0 and more.item() not in identities


def test_lru_prefers_an_empty_slot_over_evicting() -> None:
    rows, now = 8, 5000
    identities, metadata = buffers(rows, evict=True)
    ids = colliding_ids(rows, 4, seed=15)
    insert(ids[:3], identities, rows, metadata=metadata,
           input_metadata=torch.full((3,), now - 50, dtype=torch.int32),
           eviction_threshold=now - 100, eviction_policy=1)
    slots, evicted = insert(ids[3:], identities, rows, metadata=metadata,
                            input_metadata=torch.tensor([now + 1], dtype=torch.int32),
                            eviction_threshold=now, eviction_policy=1)
    assert slots.tolist() == [3] and evicted.numel() == 0


# --------------------------------------------------------------------------------------------
# opt-in admission, frequency counters


def test_opt_in_sends_unlucky_new_ids_to_reserved_slots() -> None:
    rows, reserved, max_probe, now = 64, 4, 16, 6000
    block = rows - reserved
    identities, metadata = buffers(rows, evict=True)
    ids = random_ids(40, seed=16)
    rands = torch.arange(40, dtype=torch.int32) * 5 % 100  # 0, 5, ..., 95, 0, ...
    admitted = rands < 50
    slots, evicted = insert(ids, identities, max_probe, metadata=metadata,
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
    lookup = fbgemm_lookup(ids, identities, max_probe, opt_in_prob=50, num_reserved_slots=reserved)
    assert torch.equal(lookup, slots)

    # An already admitted ID keeps its row whatever its draw.
    again, _ = insert(ids[admitted], identities, max_probe, metadata=metadata,
                      input_metadata=torch.full((int(admitted.sum()),), now + 6, dtype=torch.int32),
                      eviction_threshold=now, opt_in_prob=50, num_reserved_slots=reserved,
                      opt_in_rands=torch.full((int(admitted.sum()),), 99, dtype=torch.int32))
    assert torch.equal(again, slots[admitted])


def test_always_on_opt_in_probes_only_the_opt_in_block() -> None:
    rows, reserved = 40, 8
    identities, _ = buffers(rows)
    ids = random_ids(80, seed=17)
    slots, _ = insert(ids, identities, rows, opt_in_prob=100, num_reserved_slots=reserved)
    stored = identities[slots, 0] == ids
    assert int(stored.sum()) == rows - reserved
    assert bool((identities[rows - reserved:, 0] == -1).all())
    hashes = murmur_hash3(ids[~stored])
    assert torch.equal(slots[~stored], rows - reserved + unsigned_mod(hashes, reserved))


def test_runtime_meta_counts_hits_and_restarts_on_eviction() -> None:
    rows, now = 8, 7000
    identities, metadata = buffers(rows, evict=True)
    counts = torch.zeros(rows, 1, dtype=torch.int64)
    ids = colliding_ids(rows, rows + 1, seed=18)
    expiry = torch.full((rows,), now + 1, dtype=torch.int32)
    for _ in range(3):
        insert(ids[:rows], identities, rows, metadata=metadata, input_metadata=expiry,
               eviction_threshold=now, runtime_meta=counts)
    assert counts[:, 0].tolist() == [3] * rows
    insert(ids[rows:], identities, rows, metadata=metadata,
           input_metadata=torch.tensor([now + 9], dtype=torch.int32), eviction_threshold=now + 5,
           runtime_meta=counts)
    assert counts[:, 0].tolist() == [1] + [3] * (rows - 1)
