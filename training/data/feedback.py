"""Read serving's feedback log for training: compacted Parquet parts, a watermark, a fixed order.

Serving's ``/feedback`` sink (``serving/feedback_log.py``) acknowledges an event once it is in
a write-ahead segment and later compacts segments into immutable Parquet parts,
``part-<unix-ms>-<uuid>.parquet``, in a folder or an archive URI. Training reads only the
parts: a part is written whole (temp file + rename) and never changes, and the log already
drops duplicate ``event_id`` across parts.

The watermark is the set of part names already trained on, not a timestamp. Why: a part's
events are not a time range. Two sink replicas compact their own segments, a dead writer's
segments are compacted later by another, and a part whose archive upload failed is published
at the next pass, so a part holding older ``received_ms`` than the newest one trained can
appear after it. A ``received_ms`` cut-off would skip those events; a part-name set can
neither skip nor repeat one. It grows by one name (~50 bytes) per compaction.

Columns: ``event_id, user_id, item_id, event, timestamp, received_ms`` are required; any other
column (``request_id``, ``model_version``, ``position``, ``candidates``, ...) is ignored, so
the log's schema can grow without breaking this reader.

Order: events are sorted by ``(received_ms, event_id)``, the server's receive order with the
idempotency key as the tie-break, so the same parts give the same sequence on every run.

Example::

    mark = Watermark()                                   # a run that has trained on no feedback
    names = new_parts("data/feedback", mark)             # parts not yet trained on, by name
    events = read_parts("data/feedback", names)          # [N] rows, (received_ms, event_id) order
    mark = mark.advanced(names, events)                  # saved with the next checkpoint
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from training import storage

EVENT_COLUMNS = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event", pa.string()),
        ("timestamp", pa.int64()),
        ("received_ms", pa.int64()),
    ]
)
"""What training reads of an event; the part's other columns are left unread."""

PART_PREFIX, PART_SUFFIX = "part-", ".parquet"


class FeedbackError(RuntimeError):
    """A feedback location or part that cannot be used; the message names the file."""


class Watermark(BaseModel):
    """What a checkpoint has trained of the feedback log; saved in its ``train_state.json``.

    Args:
        parts: names of the parts trained on (every event in them, positives or not), sorted.
        events: events in those parts.
        last_received_ms / last_event_id: the newest event trained, in the log's order
            (for people reading a checkpoint; the part set is what decides).
    """

    parts: list[str] = Field(default_factory=list)
    events: int = 0
    last_received_ms: Optional[int] = None
    last_event_id: Optional[str] = None

    @classmethod
    def from_train_state(cls, state: dict) -> "Watermark":
        """The watermark of a checkpoint's train state; an empty one for a run that has
        trained on no feedback (a run of ``rayrec train --config``)."""
        return cls.model_validate(state.get("watermark") or {})

    def advanced(self, names: list[str], events: pa.Table) -> "Watermark":
        """This watermark plus parts ``names`` whose events (in log order) are ``events``."""
        last = {} if events.num_rows == 0 else {
            "last_received_ms": events.column("received_ms")[-1].as_py(),
            "last_event_id": events.column("event_id")[-1].as_py(),
        }
        return Watermark(parts=sorted({*self.parts, *names}), events=self.events + events.num_rows,
                         **{"last_received_ms": self.last_received_ms, "last_event_id": self.last_event_id, **last})


def list_parts(location: str) -> list[str]:
    """Names of the compacted parts at ``location`` (a folder or URI), sorted.

    Raises:
        FeedbackError: the location does not exist (a typo should not read as "no events").
    """
    if not storage.exists(location):
        raise FeedbackError(f"feedback log {location}: no such folder")
    return sorted(
        info.base_name
        for info in storage.list_dir(location)
        if info.base_name.startswith(PART_PREFIX) and info.base_name.endswith(PART_SUFFIX)
    )


def new_parts(location: str, watermark: Watermark) -> list[str]:
    """Parts at ``location`` not in ``watermark``, sorted by name.

    Raises:
        FeedbackError: a part the watermark holds is gone (its events are in the model, but the
            histories the next examples are cut from would silently lose them).
    """
    present = list_parts(location)
    missing = sorted(set(watermark.parts) - set(present))
    if missing:
        raise FeedbackError(
            f"feedback part {storage.join(location, missing[0])} is missing ({len(missing)} part(s) the "
            "checkpoint's watermark says were trained on are gone from the log)"
        )
    done = set(watermark.parts)
    return [name for name in present if name not in done]


def read_parts(location: str, names: list[str]) -> pa.Table:
    """The events of parts ``names`` (columns :data:`EVENT_COLUMNS`), duplicates of an
    ``event_id`` dropped, sorted by ``(received_ms, event_id)``.

    Raises:
        FeedbackError: a part is missing, unreadable, or lacks a required column; the message
            names the file.
    """
    fs, _ = storage.resolve(location)
    tables = []
    for name in names:
        path = storage.join(location, name)
        _, inner = storage.resolve(path)
        try:
            part = pq.read_table(inner, filesystem=fs)
        except FileNotFoundError:
            raise FeedbackError(f"feedback part {path} is missing") from None
        except (OSError, pa.ArrowException) as err:
            raise FeedbackError(f"feedback part {path} is unreadable: {err}") from None
        absent = [c for c in EVENT_COLUMNS.names if c not in part.column_names]
        if absent:
            raise FeedbackError(f"feedback part {path} lacks column(s) {absent}")
        try:
            tables.append(part.select(EVENT_COLUMNS.names).cast(EVENT_COLUMNS))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise FeedbackError(f"feedback part {path} has a column of the wrong type: {err}") from None
    if not tables:
        return EVENT_COLUMNS.empty_table()
    events = pa.concat_tables(tables)
    events = events.sort_by([("received_ms", "ascending"), ("event_id", "ascending")])
    return _first_of_each_id(events)


def positives(events: pa.Table, kinds: list[str]) -> pa.Table:
    """The rows whose ``event`` is one of ``kinds`` (order kept)."""
    return events.filter(pc.is_in(events.column("event"), value_set=pa.array(kinds, pa.string())))


def _first_of_each_id(events: pa.Table) -> pa.Table:
    """Keep each ``event_id``'s first row (the log is exactly once; this guards a hand-copied part)."""
    ids = events.column("event_id")
    if pc.count_distinct(ids).as_py() == events.num_rows:
        return events
    indexed = events.append_column("_row", pa.array(range(events.num_rows), pa.int64()))
    first = indexed.group_by("event_id", use_threads=False).aggregate([("_row", "min")]).column("_row_min")
    return events.take(pa.array(np.sort(first.to_numpy())))  # the first rows, in their order
