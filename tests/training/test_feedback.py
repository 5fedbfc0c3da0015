"""The feedback reader, its watermark and the examples cut from it (no Ray, no model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from training.data.feedback import FeedbackError, Watermark, new_parts, positives, read_parts
from training.data.feedback_examples import feedback_examples, pad_for_workers


def _part(folder: Path, name: str, rows: list[dict], **extra: list) -> None:
    table = pa.Table.from_pylist(rows)
    for column, values in extra.items():
        table = table.append_column(column, pa.array(values))
    pq.write_table(table, folder / name)


def _event(event_id: str, user: int, item: int, kind: str, ts: int, ms: int) -> dict:
    return {"event_id": event_id, "user_id": user, "item_id": item, "event": kind, "timestamp": ts, "received_ms": ms}


def test_parts_are_read_in_log_order_whatever_their_optional_columns(tmp_path):
    # a newer sink's extra columns, an older one's request_id, none at all: all read alike
    _part(tmp_path, "part-0000000000002-b.parquet", [_event("z", 1, 10, "click", 5, 200), _event("a", 2, 11, "click", 5, 200)],
          model_version=["v1", "v1"], position=[0, 3])
    _part(tmp_path, "part-0000000000001-a.parquet", [_event("m", 3, 12, "impression", 4, 300)], request_id=["r1"])
    _part(tmp_path, "part-0000000000003-c.parquet", [_event("a", 2, 11, "click", 5, 200)])  # a duplicate id
    (tmp_path / "part-0000000000004-d.parquet.tmp").write_bytes(b"a compaction in flight")

    mark = Watermark()
    names = new_parts(str(tmp_path), mark)
    assert names == ["part-0000000000001-a.parquet", "part-0000000000002-b.parquet", "part-0000000000003-c.parquet"]
    events = read_parts(str(tmp_path), names)
    assert events.column("event_id").to_pylist() == ["a", "z", "m"]  # (received_ms, event_id), once each
    assert events.column_names == ["event_id", "user_id", "item_id", "event", "timestamp", "received_ms"]
    assert positives(events, ["click"]).column("event_id").to_pylist() == ["a", "z"]

    mark = mark.advanced(names, events)
    assert (mark.events, mark.last_event_id, mark.last_received_ms) == (3, "m", 300)
    assert new_parts(str(tmp_path), mark) == []
    # a late part with older events than the ones trained (another replica's) is still new
    _part(tmp_path, "part-0000000000000-late.parquet", [_event("early", 4, 13, "click", 1, 50)])
    assert new_parts(str(tmp_path), mark) == ["part-0000000000000-late.parquet"]
    assert Watermark.from_train_state({"epoch": 1}) == Watermark()
    assert Watermark.from_train_state({"watermark": mark.model_dump()}) == mark


def test_a_part_without_a_required_column_is_named(tmp_path):
    rows = [_event("a", 1, 10, "click", 5, 200)]
    del rows[0]["received_ms"]
    _part(tmp_path, "part-1-a.parquet", rows)
    with pytest.raises(FeedbackError, match=r"part-1-a.parquet lacks column\(s\) \['received_ms'\]"):
        read_parts(str(tmp_path), ["part-1-a.parquet"])


def test_histories_come_from_the_run_and_earlier_new_events_in_time_order():
    history = pa.table({"user_id": [1, 1, 2], "item_id": [100, 101, 200], "timestamp": [10, 20, 10]})
    new = pa.table({"user_id": [1, 3, 1], "item_id": [102, 300, 103], "timestamp": [30, 30, 30]})  # log order
    examples = feedback_examples(history, new, history_len=2)
    assert examples.to_pydict() == {
        "user_id": [1, 3, 1],
        "item_id": [102, 300, 103],
        "history": [[100, 101], [], [101, 102]],  # the same second: received order decides
        "seq": [0, 1, 2],
    }


@pytest.mark.parametrize("n, world, batch, expected", [(5, 2, 256, (3, 1)), (64, 2, 16, (16, 2)), (65, 2, 16, (16, 3)), (1, 2, 8, (1, 1))])
def test_padding_keeps_every_example_and_trains_nothing(n, world, batch, expected):
    from training.models.two_tower import in_batch_softmax_loss

    examples = pa.table({"user_id": np.arange(n), "item_id": np.arange(n) + 100, "seq": np.arange(n)})
    padded, b, steps = pad_for_workers(examples, world, batch)
    assert (b, steps) == expected and padded.num_rows == world * steps * b
    weight = padded.column("weight").to_numpy()
    assert weight.sum() == n and sorted(s for s in padded.column("seq").to_pylist() if s >= 0) == list(range(n))

    # a zero-weight row (a copy of a real one) changes neither the loss nor any gradient
    torch.manual_seed(0)
    user, item = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    ids = torch.tensor([1, 2, 2])
    loss = in_batch_softmax_loss(user, item, ids, None, 0.1, torch.tensor([1.0, 1.0, 0.0]))
    loss.backward()
    alone = in_batch_softmax_loss(user[:2], item[:2], ids[:2], None, 0.1)
    assert torch.allclose(loss, alone) and user.grad[2].abs().sum() == 0 and item.grad[2].abs().sum() == 0


def test_replay_mixes_older_interactions_in_without_counting_them_as_events():
    from training.data.feedback_examples import with_replay

    history = pa.table({"user_id": [1, 1, 1, 2, 2], "item_id": [100, 101, 102, 200, 201], "timestamp": [10, 20, 30, 10, 20]})
    new = pa.table({"user_id": [1, 3], "item_id": [103, 300], "timestamp": [40, 40]})
    examples = feedback_examples(history, new, history_len=2)
    assert with_replay(examples, history, 0.0, 2, seed=0) is examples
    mixed = with_replay(examples, history, 2.0, 2, seed=0)
    rows = mixed.to_pylist()
    assert len(rows) == 2 + 4 and sorted(r["seq"] for r in rows) == [-1, -1, -1, -1, 0, 1]
    # replayed rows are real interactions of the run with their own histories (oldest first)
    real = {(1, 100): [], (1, 101): [100], (1, 102): [100, 101], (2, 200): [], (2, 201): [200]}
    replayed = [r for r in rows if r["seq"] < 0]
    assert all(real[(r["user_id"], r["item_id"])] == r["history"] for r in replayed)
    assert len({(r["user_id"], r["item_id"]) for r in replayed}) == 4  # drawn without replacement
    assert mixed.to_pylist() == with_replay(examples, history, 2.0, 2, seed=0).to_pylist()  # seeded
    assert len(with_replay(examples, history, 10.0, 2, seed=0)) == 2 + 5  # at most every interaction once


def test_a_zero_weight_row_moves_no_codeword_and_adds_no_commitment():
    from training.models.rq import ResidualQuantizer

    torch.manual_seed(0)
    x = torch.randn(6, 4)
    padded = torch.cat([x, torch.randn(2, 4) * 50])  # two padding rows far from everything
    weight = torch.tensor([1.0] * 6 + [0.0] * 2)
    a, b = ResidualQuantizer(4, 2, 3), ResidualQuantizer(4, 2, 3)
    a(x)  # initialise both identically on the real rows
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(x), b(padded, weight)
    assert torch.allclose(a.codebooks, b.codebooks) and torch.allclose(out_a.commitment, out_b.commitment)


def test_an_archive_uri_reads_as_a_folder_does(tmp_path):
    """Serving publishes parts to an archive URI (``FeedbackLog(archive=...)``); training reads it."""
    from tests.s3_server import s3_server
    from training import storage

    _part(tmp_path, "part-0000000000001-a.parquet", [_event("a", 1, 10, "click", 5, 200)], model_version=["v"])
    with s3_server():
        archive = "s3://rayrec/feedback"
        storage.upload(tmp_path / "part-0000000000001-a.parquet", f"{archive}/part-0000000000001-a.parquet")
        names = new_parts(archive, Watermark())
        assert names == ["part-0000000000001-a.parquet"]
        assert read_parts(archive, names).column("event_id").to_pylist() == ["a"]
        with pytest.raises(FeedbackError, match="s3://rayrec/feedback/part-9-x.parquet is missing"):
            read_parts(archive, ["part-9-x.parquet"])
