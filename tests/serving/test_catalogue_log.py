"""The catalogue log and the board's catalogue path, in process: durable changes, a torn line,
replay at a board restart, snapshots, and ``wait_applied`` over the followers' cursors."""

from __future__ import annotations

import asyncio
from pathlib import Path

from training.data.catalogue_log import CatalogueLog, ItemChange, content_table, live_state
from serving.history_board import HistoryBoard, Published
from serving.live_history import HistoryDelta

Board = HistoryBoard.func_or_class  # the plain class under the Serve deployment

TOY = ItemChange(9001, "Toy Story (1995)", ("Animation", "Comedy"), 1995)


def test_the_log_replays_each_items_last_change_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "catalogue" / "items.jsonl"
    log = CatalogueLog(path)
    assert log.read() == []
    log.append([TOY, ItemChange(9002, "Heat", (), None)])
    log.append([ItemChange.removal(9002), ItemChange.removal(50)])
    with path.open("a") as f:
        f.write('{"item_id": 9003, "tit')  # a crash inside write: never acknowledged
    reopened = CatalogueLog(path)  # ends the torn line, so the next change is whole
    reopened.append([ItemChange(9004, "Fargo", ("Crime",), 1996)])
    changes = reopened.read()
    assert changes == [TOY, ItemChange(9002, "Heat"), ItemChange.removal(9002), ItemChange.removal(50),
                       ItemChange(9004, "Fargo", ("Crime",), 1996)]  # fmt: skip
    state = live_state(changes)
    assert list(state) == [9001, 9002, 50, 9004] and state[9002].removed and not state[9001].removed


def test_content_table_is_what_the_content_encoder_reads() -> None:
    table = content_table([TOY, ItemChange(7, "Untitled")])
    assert table.column_names == ["title", "year", "genres"]
    assert table.to_pylist() == [{"title": "Toy Story (1995)", "year": 1995, "genres": ["Animation", "Comedy"]},
                                 {"title": "Untitled", "year": None, "genres": []}]  # fmt: skip


def test_the_board_makes_item_changes_durable_fans_them_out_and_replays_them(tmp_path: Path) -> None:
    path = str(tmp_path / "items.jsonl")

    async def scenario() -> None:
        board = Board(wait_s=0.05, catalogue_path=path)
        first = await board.since("", 0, "replica-a")
        assert first.snapshot and first.deltas == []
        await board.publish([Published("e1", 1, 10)])
        cursor = await board.publish_items([TOY])
        assert CatalogueLog(path).read() == [TOY]  # durable before anyone is told
        update = await board.since(first.epoch, first.cursor, "replica-a")
        assert update.histories() == [HistoryDelta(1, 10)] and update.items() == [TOY] and update.cursor == cursor
        # replica-a has not reported applying it yet: wait_applied times out with 0 of 1
        assert await board.wait_applied(cursor, timeout_s=0.1) == (0, 1)
        waiting = asyncio.create_task(board.wait_applied(cursor, timeout_s=5))
        await asyncio.sleep(0.01)
        poll = asyncio.create_task(board.since(update.epoch, update.cursor, "replica-a"))  # "applied up to cursor"
        assert await waiting == (1, 1)
        await poll
        stranger = await board.since("", 0, "replica-b")  # a new replica: histories and items in a snapshot
        assert stranger.snapshot and stranger.histories() == [HistoryDelta(1, 10)] and stranger.items() == [TOY]
        await board.publish_items([ItemChange.removal(9001)])
        assert board.items() == [ItemChange.removal(9001)]

    asyncio.run(scenario())
    restarted = Board(catalogue_path=path)  # a new board replays the log: the last change of each item
    assert restarted.items() == [ItemChange.removal(9001)]
    assert restarted.snapshot() == [ItemChange.removal(9001)]


def test_a_board_without_a_catalogue_log_refuses_items() -> None:
    async def scenario() -> None:
        board = Board(wait_s=0.05)
        try:
            await board.publish_items([TOY])
        except RuntimeError as err:
            assert "catalogue" in str(err)
        else:
            raise AssertionError("publish_items without a catalogue log succeeded")

    asyncio.run(scenario())
