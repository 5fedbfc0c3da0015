"""MPZCH CPU insert on two threads (embeddings/csrc/zch_partition.h): a batch split by bucket
ranges writes the same table and returns the same slots, evictions and counters as one thread,
bit for bit; batches that cannot be split cleanly run in one part.

(Whether a helper thread takes any part depends on scheduling; the equality must hold however
the parts fall, and the sequential reference is 1 thread. Runs repeat to sample schedules.)
"""

from __future__ import annotations

from typing import Iterator, Optional

import pytest
import torch

from embeddings.kernel import InsertCounts
from tests.embeddings.hash_oracle import random_ids
from tests.embeddings.kernel_tables import buffers, insert

BUCKETS, BUCKET_ROWS, MAX_PROBE = 8, 1024, 16
ROWS = BUCKETS * BUCKET_ROWS
NOW = 1000
POLICY = {"ttl": 0, "lru": 1}


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def windows(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """TorchRec's bucket windows: bucket = id % buckets, ``BUCKET_ROWS`` rows each ``[B]``."""
    bucket = ids % BUCKETS
    return {"local_sizes": torch.full_like(ids, BUCKET_ROWS), "offsets": bucket * BUCKET_ROWS}


def call_args(ids: torch.Tensor, eviction: str, opt_in: bool, expiry: int, threshold: int, seed: int) -> dict:
    args = dict(windows(ids))
    if eviction != "none":
        args.update(input_metadata=torch.full_like(ids, expiry, dtype=torch.int32),
                    eviction_threshold=threshold, eviction_policy=POLICY[eviction])
    if opt_in:
        generator = torch.Generator().manual_seed(seed)
        args.update(opt_in_prob=60, num_reserved_slots=16,
                    opt_in_rands=torch.randint(0, 100, ids.shape, dtype=torch.int32, generator=generator))
    return args


def filled_table(eviction: str, opt_in: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """A table at load ~0.7 whose residents expire at NOW + 1, and the residents ``[6000]``."""
    identities, metadata = buffers(ROWS, evict=eviction != "none")
    residents = random_ids(6000, seed=21)
    insert(residents, identities, MAX_PROBE, metadata=metadata,
           **call_args(residents, eviction, opt_in, expiry=NOW + 1, threshold=NOW, seed=1))
    return identities, metadata, residents


def run(threads: int, ids: torch.Tensor, identities: torch.Tensor, metadata: Optional[torch.Tensor], **args):
    """One insert on copies of the table with ``threads`` torch threads; everything it produced."""
    torch.set_num_threads(threads)
    identities, metadata = identities.clone(), None if metadata is None else metadata.clone()
    counters = InsertCounts.buffer()
    slots, evicted = insert(ids, identities, MAX_PROBE, metadata=metadata, counters=counters, **args)
    return slots, evicted, identities, metadata, InsertCounts.read(counters)


@pytest.mark.parametrize("opt_in", [False, True])
@pytest.mark.parametrize("eviction", ["none", "ttl", "lru"])
def test_two_threads_give_the_single_thread_result_bit_for_bit(restore_threads, eviction: str, opt_in: bool) -> None:
    identities, metadata, residents = filled_table(eviction, opt_in)
    newcomers = random_ids(12000, seed=22)[-6000:]  # distinct from the residents' draw
    ids = torch.cat([newcomers, residents[:2000], newcomers[:500]])  # new, resident, repeated
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(3))]
    # Six hours on: every resident has expired, so the newcomers can evict (when eviction is on).
    args = call_args(ids, eviction, opt_in, expiry=NOW + 10, threshold=NOW + 5, seed=2)

    one = run(1, ids, identities, metadata, **args)
    two = run(2, ids, identities, metadata, **args)
    for _ in range(5):  # other schedules of the parts over the two threads
        again = run(2, ids, identities, metadata, **args)
        assert torch.equal(again[0], one[0]) and torch.equal(again[2], one[2])

    assert one[4].parts == 1 and two[4].parts == 2  # the second run really was split, a part a thread
    assert torch.equal(one[0], two[0])  # slots
    assert (one[1] is None) == (eviction == "none") and (two[1] is None) == (eviction == "none")
    if eviction != "none":
        assert torch.equal(one[1], two[1])  # evicted slots
        assert torch.equal(one[3], two[3])  # metadata
    assert torch.equal(one[2], two[2])  # identities
    counts_one, counts_two = one[4], two[4]
    assert (counts_one.new_rows, counts_one.owned, counts_one.evictions, counts_one.evicted_expiry_sum) == (
        counts_two.new_rows, counts_two.owned, counts_two.evictions, counts_two.evicted_expiry_sum)
    # ...and the batch did everything a batch can: claimed rows, hit, fell back, evicted.
    assert counts_one.new_rows > 0 and counts_one.owned < ids.numel()
    assert counts_one.owned > counts_one.new_rows + counts_one.evictions  # hits
    if eviction != "none":
        assert counts_one.evictions > 0 and counts_one.evictions == one[1].numel()
        assert counts_one.evicted_expiry_sum == (NOW + 1) * counts_one.evictions


def test_batches_that_cannot_be_split_run_in_one_part_and_stay_exact(restore_threads) -> None:
    ids = random_ids(9000, seed=23)
    identities, _ = buffers(ROWS)

    # A window that crosses the cut at ROWS / 2 keeps the batch whole.
    half = ROWS // 2
    low = ids % 2 == 0
    crossing = {"local_sizes": torch.where(low, half + 8, half), "offsets": torch.where(low, 0, half)}
    one = run(1, ids, identities, None, **crossing)
    two = run(2, ids, identities, None, **crossing)
    assert two[4].parts == 1
    assert torch.equal(one[0], two[0]) and torch.equal(one[2], two[2])

    # No windows (the whole table is one), or fewer than 8,192 ids (kMinIdsToSplit): one part.
    assert run(2, ids, identities, None)[4].parts == 1
    assert run(2, ids[:8191], identities, None, **windows(ids[:8191]))[4].parts == 1
    assert run(2, ids[:8192], identities, None, **windows(ids[:8192]))[4].parts == 2
    # One part a thread (each a range of whole buckets).
    assert run(2, ids, identities, None, **windows(ids))[4].parts == 2
    assert run(4, ids, identities, None, **windows(ids))[4].parts == 4


def test_counters_reject_a_wrong_buffer() -> None:
    identities, _ = buffers(64)
    with pytest.raises(RuntimeError, match="counters must be a contiguous CPU int64 tensor"):
        insert(torch.tensor([1, 2]), identities, 4, counters=torch.zeros(4, dtype=torch.int64))


def test_a_window_outside_the_table_is_named_on_the_split_path_too(restore_threads) -> None:
    ids = random_ids(2048, seed=29)
    identities, _ = buffers(ROWS)
    args = windows(ids)
    args["offsets"][1500] = ROWS  # the window [ROWS, ROWS + BUCKET_ROWS) lies past the table
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="ID #1500 has window"):
        insert(ids, identities, MAX_PROBE, **args)
    assert bool((identities == -1).all())  # the check runs before any probe: the table is untouched
