"""The precompute cache and the predictor's activity model, in-process."""

from __future__ import annotations

import numpy as np

from serving.fm_cache import PairCache, UserRows
from serving.precompute import ActivityTracker, idle_class


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def test_hit_returns_the_stored_row_and_miss_returns_zeros() -> None:
    cache = PairCache(capacity=10, ttl_s=60)
    cache.put(ids(1, 1), ids(7, 8), "v1", np.array([[1, 2], [3, 4]], np.float32))
    emb, present, ages = cache.get(ids(1, 1, 2), ids(8, 9, 7), "v1", dim=2)
    assert present.tolist() == [True, False, False]
    assert emb.tolist() == [[3, 4], [0, 0], [0, 0]]
    assert ages[0] >= 0 and np.isnan(ages[1:]).all()
    summary = cache.summary()
    assert (summary["hits"], summary["lookups"]) == (1, 3)
    assert summary["speculation_precision"] == 0.5  # one of two precomputed pairs was read


def test_another_fm_version_misses_and_counts_as_stale() -> None:
    cache = PairCache(capacity=10, ttl_s=60)
    cache.put(ids(1), ids(7), "v1", np.ones((1, 2), np.float32))
    cache.put(ids(1), ids(8), "v2", np.ones((1, 2), np.float32))
    _, present, _ = cache.get(ids(1), ids(7), "v2", dim=2)
    assert not present.any()
    assert cache.summary()["stale_entries"] == 1


def test_ttl_expires_and_lru_evicts_the_least_recently_used() -> None:
    clock = Clock()
    cache = PairCache(capacity=2, ttl_s=10, clock=clock)
    cache.put(ids(1, 2), ids(1, 2), "v", np.ones((2, 1), np.float32))
    cache.get(ids(1), ids(1), "v", dim=1)  # (1, 1) is now the most recent
    cache.put(ids(3), ids(3), "v", np.ones((1, 1), np.float32))  # evicts (2, 2)
    assert cache.get(ids(1, 2, 3), ids(1, 2, 3), "v", dim=1)[1].tolist() == [True, False, True]
    assert cache.missing(ids(1, 3), ids(1, 3), "v", fresh_for_s=5).tolist() == [False, False]
    clock.now = 6
    assert cache.missing(ids(1), ids(1), "v", fresh_for_s=5).tolist() == [True]  # expires soon: refresh
    clock.now = 11
    assert not cache.get(ids(1), ids(1), "v", dim=1)[1].any()
    assert cache.summary()["expired"] == 1 and len(cache) == 1


def test_clear_empties_the_cache_and_its_counters() -> None:
    cache = PairCache(capacity=10, ttl_s=60)
    cache.put(ids(1), ids(7), "v1", np.ones((1, 2), np.float32))
    cache.get(ids(1), ids(7), "v1", dim=2)
    cache.clear()
    assert len(cache) == 0 and cache.summary()["lookups"] == 0
    assert not cache.get(ids(1), ids(7), "v1", dim=2)[1].any()


def test_activity_ranks_recent_frequent_users_first_and_decays() -> None:
    clock = Clock()
    activity = ActivityTracker(half_life_s=10, max_users=3, clock=clock)
    for _ in range(3):
        activity.touch(1)
    activity.touch(2)
    assert activity.top(2) == [1, 2]
    clock.now = 50  # five half-lives: user 1's 3 visits now weigh 3/32
    activity.touch(2)
    activity.touch(3)
    assert activity.top(3) == [2, 3, 1]
    activity.touch(4)  # over max_users: the least recently touched (1) is forgotten
    assert 1 not in activity.top(10) and len(activity) == 3


def test_user_rows_hold_every_live_row_of_a_user_and_lookup_picks_the_candidates() -> None:
    clock = Clock()
    cache = PairCache(capacity=10, ttl_s=10, clock=clock)
    cache.put(ids(1, 1, 2), ids(7, 8, 7), "v1", np.array([[1, 1], [2, 2], [3, 3]], np.float32))
    cache.put(ids(1), ids(9), "v0", np.array([[9, 9]], np.float32))  # another FM version
    rows = cache.user_rows(1)
    assert sorted(rows.items.tolist()) == [7, 8, 9] and rows.ok
    emb, present = rows.lookup(ids(8, 5, 9, 7), "v1", dim=2)
    assert present.tolist() == [True, False, False, True]  # 9 is v0's row: a miss for v1
    assert emb.tolist() == [[2, 2], [0, 0], [0, 0], [1, 1]]
    assert cache.summary()["lookups"] == 0  # reading ahead is not a lookup ...
    cache.record_reads(ids(1, 1, 1, 1), ids(8, 5, 9, 7), "v1", present)  # ... what was used is
    summary = cache.summary()
    assert (summary["lookups"], summary["hits"], summary["used"]) == (4, 2, 2)
    clock.now = 11  # past the TTL: gone from user_rows too, and the user's index with it
    assert cache.user_rows(1).items.tolist() == [] and cache.summary()["expired"] == 3
    assert cache.user_rows(3).items.tolist() == []
    assert cache.summary()["user_reads"] == 3


def test_record_reads_keeps_lru_order_like_get() -> None:
    cache = PairCache(capacity=2, ttl_s=60)
    cache.put(ids(1, 2), ids(1, 2), "v", np.ones((2, 1), np.float32))
    cache.record_reads(ids(1), ids(1), "v", np.array([True]))  # (1, 1) is now the most recent
    cache.put(ids(3), ids(3), "v", np.ones((1, 1), np.float32))  # evicts (2, 2)
    assert cache.user_rows(2).items.tolist() == [] and cache.user_rows(1).items.tolist() == [1]


def test_a_failed_prefetch_has_no_rows_and_says_so() -> None:
    rows = UserRows.failed(4)
    assert not rows.ok
    emb, present = rows.lookup(ids(1, 2), "v", dim=3)
    assert emb.shape == (2, 3) and not present.any()


def test_idle_class_moves_only_the_calling_thread_and_its_children() -> None:
    """The FM workers' compute threads run in SCHED_IDLE; the class is per thread (as Linux
    niceness is), so the caller's other threads keep theirs and threads it starts inherit it."""
    import os
    import threading

    seen: dict[str, int] = {}

    def child() -> None:
        seen["child"] = os.sched_getscheduler(0)

    def worker() -> None:
        seen["moved"] = idle_class()
        seen["worker"] = os.sched_getscheduler(0)
        t = threading.Thread(target=child)
        t.start()
        t.join()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["moved"] is True
    assert seen["worker"] == os.SCHED_IDLE and seen["child"] == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the test's own thread is untouched

