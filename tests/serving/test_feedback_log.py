"""The feedback log in-process: durable appends, compaction to Parquet, exactly once across crashes."""

from __future__ import annotations

from pathlib import Path

from serving.feedback_log import (
    FeedbackEvent,
    FeedbackLog,
    count_by_event_id,
    read_feedback,
)


def events(prefix: str, n: int) -> list[FeedbackEvent]:
    return [FeedbackEvent(f"{prefix}-{i}", user_id=i, item_id=100 + i, event="click", timestamp=1_700_000_000 + i) for i in range(n)]


def test_appended_events_are_in_the_wal_before_compaction_and_in_parquet_after(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path)
    assert log.append(events("a", 5)) == 5
    assert read_feedback(tmp_path).num_rows == 0 and log.pending_segments() == 1
    assert log.compact() == 5
    table = read_feedback(tmp_path)
    assert sorted(table.column("event_id").to_pylist()) == sorted(f"a-{i}" for i in range(5))
    assert dict(zip(table.column("event_id").to_pylist(), table.column("item_id").to_pylist()))["a-3"] == 103
    assert log.pending_segments() == 0
    log.close()


def test_resent_event_ids_are_logged_once(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path)
    log.append(events("a", 3))
    log.compact()
    log.append(events("a", 3) + events("b", 2))  # a client retry plus new events
    log.append(events("b", 2))
    assert log.compact() == 2
    assert count_by_event_id(read_feedback(tmp_path)) == {**{f"a-{i}": 1 for i in range(3)}, **{f"b-{i}": 1 for i in range(2)}}
    log.close()


def test_a_killed_writer_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    """Simulate a crash: the process dies after acks, without compacting or closing."""
    log = FeedbackLog(tmp_path)
    log.append(events("a", 4))
    log._lock_file.close()  # what the OS does to a killed process's lock
    # a torn tail: a write the crash interrupted, never acknowledged
    segment = next((tmp_path / "wal").glob("segment-*.jsonl"))
    with open(segment, "ab") as f:
        f.write(b'{"event_id": "torn", "user_')
    restarted = FeedbackLog(tmp_path)
    assert restarted.compact() == 4
    assert count_by_event_id(read_feedback(tmp_path)) == {f"a-{i}": 1 for i in range(4)}
    restarted.close()


def test_a_crash_between_parquet_write_and_wal_delete_does_not_duplicate(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path)
    log.append(events("a", 3))
    segments = list((tmp_path / "wal").glob("*.jsonl"))
    saved = {p: p.read_bytes() for p in segments}
    log.compact()
    for path, data in saved.items():  # the segments "survived" the crash
        path.write_bytes(data)
    (tmp_path / "part-junk.parquet.tmp").write_bytes(b"half a file")  # and a torn temp part
    log._lock_file.close()
    restarted = FeedbackLog(tmp_path)
    assert restarted.compact() == 0
    assert not list(tmp_path.glob("*.tmp"))
    assert count_by_event_id(read_feedback(tmp_path)) == {f"a-{i}": 1 for i in range(3)}
    restarted.close()


def test_two_writers_share_a_folder_and_a_dead_ones_segments_are_adopted(tmp_path: Path) -> None:
    first, second = FeedbackLog(tmp_path), FeedbackLog(tmp_path)
    first.append(events("a", 3))
    second.append(events("b", 2) + events("a", 1))  # a retry that landed on the other writer
    assert second.compact() == 3  # its own events; the live first writer's segment is left alone
    assert first.pending_segments() == 1
    first._file.close()
    first._lock_file.close()  # first writer killed
    third = FeedbackLog(tmp_path)
    assert third.compact() == 2  # a-0, a-2 adopted from the dead writer; a-1 was already logged
    assert count_by_event_id(read_feedback(tmp_path)) == {"a-0": 1, "a-1": 1, "a-2": 1, "b-0": 1, "b-1": 1}
    assert third.pending_segments() == 0
    assert [p.name for p in (tmp_path / "wal").glob("*.lock")] != []  # live writers keep theirs
    second.close()
    third.close()
    assert not list((tmp_path / "wal").glob("*.lock"))


def test_serving_fields_round_trip_and_old_parts_still_read(tmp_path: Path) -> None:
    """Position, candidate set size and versions reach Parquet; a part written before those
    columns existed reads with them null (what counterfactual evaluation of old logs sees)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pa.table({"event_id": ["old"], "user_id": [1], "item_id": [2], "event": ["click"], "timestamp": [0],
                    "request_id": [""], "received_ms": [1]})  # fmt: skip
    pq.write_table(old, tmp_path / "part-0000000000001-00000000.parquet")
    log = FeedbackLog(tmp_path)
    log.append([FeedbackEvent("new", 1, 3, "click", 0, request_id="r", received_ms=2, model_version="run/epoch-0001",
                              ranker_version="rk", fm_version="rk/fm", position=4, candidates=50)])  # fmt: skip
    log.compact()
    rows = {r["event_id"]: r for r in read_feedback(tmp_path).to_pylist()}
    assert rows["new"] | {} == {**rows["new"], "model_version": "run/epoch-0001", "ranker_version": "rk",
                                "fm_version": "rk/fm", "position": 4, "candidates": 50}  # fmt: skip
    assert (rows["old"]["position"], rows["old"]["candidates"], rows["old"]["model_version"]) == (None, None, None)
    log.close()
