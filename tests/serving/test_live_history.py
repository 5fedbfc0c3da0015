"""Live histories in process: the per-replica overlay, the board's deltas and snapshots, and what
retrieval does with them (exclusion, a moved query, users known only through live items)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from serving import ui
from serving.feedback_log import FeedbackEvent, FeedbackLog
from serving.history_board import HistoryBoard, Published
from serving.live_history import HistoryDelta, LiveHistory, RankerHistories, is_positive
from serving.retriever import Query, RetrievalIndex
from tests.serving.toy_run import UNKNOWN_USER, ToyRun

Board = HistoryBoard.func_or_class  # the plain class under the Serve deployment


def test_only_clicks_and_engagements_count() -> None:
    assert is_positive("click") and is_positive("engagement")
    assert not is_positive("impression") and not is_positive("skip")


def test_overlay_is_bounded_per_user_and_moves_a_re_engaged_item_to_the_end() -> None:
    live = LiveHistory(history_len=3)
    live.apply([HistoryDelta(7, i) for i in (1, 2, 3, 4)] + [HistoryDelta(7, 2), HistoryDelta(8, 9)])
    assert live.items(7) == [3, 4, 2] and live.items(8) == [9] and live.items(99) == []
    assert [t.tolist() for t in live.for_users(torch.tensor([8, 99]))] == [[9], []]
    live.replace([HistoryDelta(5, 1)])
    assert live.users() == [5]


def test_ranker_histories_append_live_items_within_the_window() -> None:
    class Frozen:
        def gather(self, users: np.ndarray) -> pa.Array:
            return pa.array([[10, 11] if u == 1 else [] for u in users], pa.list_(pa.int64()))

    live = LiveHistory()
    histories = RankerHistories(Frozen(), live, history_len=2)
    assert histories.gather(np.array([1, 2])).to_pylist() == [[10, 11], []]
    live.apply([HistoryDelta(1, 20), HistoryDelta(2, 30)])
    assert histories.gather(np.array([1, 2, 1])).to_pylist() == [[11, 20], [30], [11, 20]]


def test_board_answers_deltas_after_a_cursor_and_snapshots_a_stranger() -> None:
    async def scenario() -> None:
        board = Board(history_len=5, max_deltas=3, wait_s=0.05)
        first = await board.since("", 0)  # a new replica: a snapshot (empty)
        assert first.snapshot and first.deltas == []
        assert await board.publish([Published("e1", 1, 10), Published("e2", 2, 20), Published("e1", 1, 10)]) == 2
        update = await board.since(first.epoch, first.cursor)
        assert not update.snapshot and update.deltas == [HistoryDelta(1, 10), HistoryDelta(2, 20)]
        idle = await board.since(update.epoch, update.cursor)  # nothing new: waits wait_s, answers none
        assert idle.deltas == [] and idle.cursor == update.cursor
        waiting = asyncio.create_task(board.since(update.epoch, update.cursor))  # a long poll, woken by news
        await asyncio.sleep(0.01)
        await board.publish([Published("e3", 1, 11)])
        assert (await waiting).deltas == [HistoryDelta(1, 11)]
        await board.publish([Published(f"f{i}", 3, i) for i in range(4)])  # past max_deltas
        behind = await board.since(update.epoch, update.cursor)
        assert behind.snapshot and set(behind.deltas) >= {HistoryDelta(1, 10), HistoryDelta(1, 11), HistoryDelta(3, 3)}
        restarted = await board.since("another-epoch", 99)
        assert restarted.snapshot

    asyncio.run(scenario())


def test_board_rebuilds_from_compacted_and_pending_events(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path)
    log.append([FeedbackEvent("a", 1, 10, "click", 0, received_ms=1), FeedbackEvent("b", 1, 11, "impression", 0, received_ms=2)])
    log.compact()
    log.append([FeedbackEvent("c", 1, 12, "engagement", 0, received_ms=3)])  # only in the WAL
    board = Board(str(tmp_path))
    assert board.history(1) == [10, 12]


@pytest.fixture()
def index(toy_run: ToyRun) -> RetrievalIndex:
    return RetrievalIndex(toy_run.run_dir / "index", live=LiveHistory(history_len=50))


def test_a_live_item_is_excluded_and_pulls_the_query_towards_it(index: RetrievalIndex, toy_run: ToyRun) -> None:
    user = int(toy_run.user_ids[3])
    before = index.search([Query(user, 10)])[0].item_ids
    clicked = before[0]
    assert index.live is not None
    index.live.apply([HistoryDelta(user, clicked)])
    after = index.search([Query(user, 10)])[0]
    assert clicked not in after.item_ids and after.fallback is None
    assert clicked in index.search([Query(user, 10, exclude_seen=False)])[0].item_ids


def test_a_user_known_only_live_is_searched_from_their_items(index: RetrievalIndex, toy_run: ToyRun) -> None:
    stranger = UNKNOWN_USER + 1
    assert index.search([Query(stranger, 5)])[0].fallback == "popularity"
    item = int(toy_run.item_ids[0])
    assert index.live is not None
    index.live.apply([HistoryDelta(stranger, item)])
    answer = index.search([Query(stranger, 5)])[0]
    assert answer.fallback == "live_history" and answer.index == "exact"
    assert item not in answer.item_ids
    row = int(np.nonzero(toy_run.item_ids == item)[0][0])  # nearest by dot product with the item
    others = [i for i in np.argsort(-(toy_run.item_emb @ toy_run.item_emb[row]), kind="stable").tolist() if i != row]
    assert answer.item_ids == toy_run.item_ids[others[:5]].tolist()


def test_popularity_fallback_leaves_out_live_items_without_item_vectors(toy_run: ToyRun) -> None:
    index = RetrievalIndex(toy_run.run_dir / "index", live=LiveHistory())
    index.item_vectors = None  # as for a learned index: no vectors to search from
    stranger = UNKNOWN_USER + 2
    assert index.live is not None
    index.live.apply([HistoryDelta(stranger, toy_run.popular[0])])
    answer = index.search([Query(stranger, 5)])[0]
    assert answer.fallback == "popularity" and answer.item_ids == toy_run.popular[1:6]


def test_history_shows_an_item_engaged_again_once_at_its_newest(index: RetrievalIndex, toy_run: ToyRun) -> None:
    user = max(toy_run.seen, key=lambda u: len(toy_run.seen[u]))
    before = ui.user_history(index, {}, user, limit=200)
    assert before is not None and before.live == 0
    oldest = before.items[-1].item_id
    assert index.live is not None
    index.live.apply([HistoryDelta(user, oldest)])
    after = ui.user_history(index, {}, user, limit=200)
    assert after is not None and [i.item_id for i in after.items] == [oldest] + [i.item_id for i in before.items[:-1]]
    assert (after.total, after.live) == (before.total, 1)
