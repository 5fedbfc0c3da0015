"""The feedback log: impressions and engagements, durable once acknowledged, compacted to Parquet.

Why not write Parquet per request: a Parquet file is only readable once closed, and one file per
event would bury the next training run in tiny files. So an event is acknowledged once it is in
a write-ahead segment (JSON lines, flushed and ``fsync``-ed), and a compaction step later moves
closed segments into Parquet parts. Layout under ``<dir>`` (default ``data/feedback/``)::

    wal/segment-<writer>-<seq>.jsonl    acknowledged events not yet compacted (one JSON per line)
    part-<unix-ms>-<uuid>.parquet       compacted events (columns: FEEDBACK_SCHEMA)

Exactly once: every event carries a client-chosen ``event_id`` (an idempotency key, so a client
retrying a request whose ack it lost sends the same ids). Compaction drops ids already in a
Parquet part or earlier in the same pass, writes the part atomically (temporary file, fsync,
rename, fsync of the folder) and only then deletes the segments. A crash at any point leaves
either the segments (compacted again on restart, their ids dropped if the part made it) or the
part; never a lost acknowledged event and never a duplicate. A torn last line (a crash inside
``write``) belongs to an append that was never acknowledged and is skipped.

Several writers may share a folder (two sink replicas during a rollout, or more by choice):
each appends only to its own segments and holds ``wal/writer-<id>.lock`` (``flock``) while
alive. Compaction runs under ``<dir>/.compact.lock``, takes the writer's own segments plus
those of writers whose lock is free (dead: killed or finished), and re-reads the event ids of
parts other writers wrote since its last pass, so dedupe holds across writers too.

Object storage: the WAL needs a local disk that survives the process (``fsync``, ``flock``,
rename; on Kubernetes a persistent volume), but the parts are what training reads. With an
``archive`` URI (``s3://bucket/feedback``), each part is also copied there once it is durable
locally, and a part whose upload failed (store unreachable) is retried at the next compaction;
:func:`read_feedback` reads a URI as it reads a folder.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training import storage

logger = logging.getLogger("ray.serve")

FEEDBACK_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("event", pa.string()),
        ("timestamp", pa.int64()),
        ("request_id", pa.string()),
        ("received_ms", pa.int64()),
        # what counterfactual evaluation needs (null in parts written before they existed:
        # read_feedback reads every part with this schema, so old parts fill them with nulls)
        ("model_version", pa.string()),
        ("ranker_version", pa.string()),
        ("fm_version", pa.string()),
        ("position", pa.int32()),
        ("candidates", pa.int32()),
    ]
)


SESSION_START_EVENT = "session_start"
"""The event kind a client sends when a user's session starts, before its first ``/recommend``
(its ``item_id`` is ignored; send 0). Logged like any event; the FeedbackSink also forwards it
to the precompute ``Predictor.observe_session_start``, which precomputes that user first."""


@dataclass(frozen=True)
class FeedbackEvent:
    """One logged event (validated by the HTTP schema before it gets here).

    Args:
        event_id: client-chosen idempotency key, unique per event.
        user_id / item_id: raw IDs.
        event: kind, e.g. "impression", "click", "engagement".
        timestamp: when it happened on the client (unix seconds).
        request_id: the ``/recommend`` answer that showed the item ("" when unknown).
        received_ms: server receive time (unix ms), set by the sink.
        model_version / ranker_version / fm_version: the versions the ``/recommend`` answer
            that showed the item reported (None: not sent; a retrieval-only app has no ranker).
        position: the 0-based rank the item was shown at (None: not sent).
        candidates: the size of the candidate set the shown list was chosen from (None: not sent).
    """

    event_id: str
    user_id: int
    item_id: int
    event: str
    timestamp: int
    request_id: str = ""
    received_ms: int = 0
    model_version: str | None = None
    ranker_version: str | None = None
    fm_version: str | None = None
    position: int | None = None
    candidates: int | None = None


class FeedbackLog:
    """Append (durable on return) and compact (segments → Parquet) for one folder.

    Args:
        root: the log folder; created on first use.
        archive: where compacted parts are published too (a URI or folder; None: nowhere).
    """

    def __init__(self, root: str | Path, archive: str | None = None) -> None:
        self.root = Path(root)
        self.archive = archive
        self._archived: set[str] | None = None  # part names known to be in the archive
        self.wal = self.root / "wal"
        self.wal.mkdir(parents=True, exist_ok=True)
        self._writer = uuid.uuid4().hex[:12]
        self._lock_file = open(self.wal / f"writer-{self._writer}.lock", "w")  # noqa: SIM115 (held for life)
        fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh name: never contended
        self._seq = 0
        self._segment: Path | None = None
        self._file = None
        self.known_ids: set[str] = set()
        self._loaded_parts: set[str] = set()

    # ------------------------------------------------------------------ append
    def append(self, events: Iterable[FeedbackEvent]) -> int:
        """Write events to the open segment and fsync; returns how many. Durable on return."""
        lines = "".join(json.dumps(asdict(e), separators=(",", ":")) + "\n" for e in events)
        if not lines:
            return 0
        if self._file is None:
            self._open_segment()
        assert self._file is not None
        self._file.write(lines.encode())
        self._file.flush()
        os.fsync(self._file.fileno())
        return lines.count("\n")

    def _open_segment(self) -> None:
        self._seq += 1
        self._segment = self.wal / f"segment-{self._writer}-{self._seq:08d}.jsonl"
        self._file = open(self._segment, "ab")  # noqa: SIM115 (the open segment, closed on rotate)
        _fsync_dir(self.wal)  # the new file's name must survive a crash too

    def _close_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._segment = None, None

    # ------------------------------------------------------------------ compact
    def compact(self) -> int:
        """Move this writer's segments (the open one is closed first) and those of dead writers
        into one new Parquet part; returns the number of new events (duplicate ids dropped)."""
        self._close_segment()
        with open(self.root / ".compact.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # one compaction at a time across writers
            self._load_new_part_ids()
            segments, dead_locks = self._compactable_segments()
            rows: list[dict] = []
            for segment in segments:
                for event in _read_segment(segment):
                    if event["event_id"] not in self.known_ids:
                        self.known_ids.add(event["event_id"])
                        rows.append(event)
            if rows:
                table = pa.Table.from_pylist(rows, schema=FEEDBACK_SCHEMA)
                final = self.root / f"part-{int(time.time() * 1e3):013d}-{uuid.uuid4().hex[:8]}.parquet"
                tmp = final.with_suffix(".parquet.tmp")
                pq.write_table(table, tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                _fsync_dir(self.root)
                self._loaded_parts.add(final.name)
            for path in segments + dead_locks:  # only after the part is durable
                path.unlink()
            _fsync_dir(self.wal)
            self._publish_parts()
        return len(rows)

    def _publish_parts(self) -> None:
        """Copy to the archive every local part not there yet (under the compaction lock)."""
        if self.archive is None:
            return
        try:
            if self._archived is None:
                self._archived = {i.base_name for i in storage.list_dir(self.archive)}
            for part in sorted(self.root.glob("part-*.parquet")):
                if part.name not in self._archived:
                    storage.upload(part, storage.join(self.archive, part.name))
                    self._archived.add(part.name)
        except OSError as err:  # the store is down: the parts are safe locally, retried next pass
            logger.warning("feedback parts not yet published to %s: %s", self.archive, err)

    def _compactable_segments(self) -> tuple[list[Path], list[Path]]:
        """(segments to compact, lock files of dead writers to remove afterwards)."""
        by_writer: dict[str, list[Path]] = {}
        for path in sorted(self.wal.glob("segment-*.jsonl")):
            by_writer.setdefault(path.stem.split("-")[1], []).append(path)
        for lock in self.wal.glob("writer-*.lock"):
            by_writer.setdefault(lock.stem.split("-")[1], [])
        segments, dead_locks = [], []
        for writer, paths in by_writer.items():
            lock = self.wal / f"writer-{writer}.lock"
            if writer != self._writer and lock.exists():
                if _is_locked(lock):
                    continue  # a live writer: its segments are its own to compact
                dead_locks.append(lock)
            segments += paths
        return segments, dead_locks

    def _load_new_part_ids(self) -> None:
        # Why every id: exactly-once needs them, and ids are small (tens of bytes each); a log
        # past memory would keep a per-day id set instead.
        for stale in self.root.glob("*.parquet.tmp"):  # only under the compaction lock: never live
            stale.unlink()
        for part in sorted(self.root.glob("part-*.parquet")):
            if part.name not in self._loaded_parts:
                ids = pq.read_table(part, columns=["event_id"]).column("event_id").to_pylist()
                self.known_ids.update(ids)
                self._loaded_parts.add(part.name)

    def pending_segments(self) -> int:
        return len(list(self.wal.glob("segment-*.jsonl")))

    def close(self) -> None:
        """Compact what is pending and release this writer's lock (graceful shutdown)."""
        try:
            self.compact()
        finally:
            self._lock_file.close()
            (self.wal / f"writer-{self._writer}.lock").unlink(missing_ok=True)


def read_feedback(root: str | Path) -> pa.Table:
    """All compacted events under ``root``, a folder or a URI (an empty table with the schema
    when there are none)."""
    fs, inner = storage.resolve(root)
    parts = sorted(i.path for i in storage.list_dir(root) if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
    if not parts:
        return FEEDBACK_SCHEMA.empty_table()
    table = pa.concat_tables(pq.read_table(p, schema=FEEDBACK_SCHEMA, filesystem=fs) for p in parts)
    return table.sort_by([("received_ms", "ascending")]) if table.num_rows else table


def read_acknowledged(root: str | Path) -> pa.Table:
    """Every acknowledged event under the local folder ``root``: the compacted parts plus the
    write-ahead segments not yet compacted (each event id once), by ``received_ms``.

    Why not :func:`read_feedback` alone: a reader that must see what was acknowledged a moment
    ago (``serving.history_board`` rebuilding live histories after a restart) would otherwise
    miss up to a compaction interval of events.
    """
    root = Path(root)
    pending: dict[str, dict] = {}
    for segment in sorted((root / "wal").glob("segment-*.jsonl")):  # segments first: one compacted
        try:  # after this read is in a part by the time the parts are read, and deduped below
            for event in _read_segment(segment):
                pending.setdefault(event["event_id"], event)
        except FileNotFoundError:  # compacted between the listing and the read: in a part now
            continue
    compacted = read_feedback(root)
    for event_id in compacted.column("event_id").to_pylist():
        pending.pop(event_id, None)
    if not pending:
        return compacted
    table = pa.concat_tables([compacted, pa.Table.from_pylist(list(pending.values()), schema=FEEDBACK_SCHEMA)])
    return table.sort_by([("received_ms", "ascending")])


def count_by_event_id(table: pa.Table) -> dict[str, int]:
    """event_id → how many rows carry it (1 everywhere for an exactly-once log)."""
    counts = pc.value_counts(table.column("event_id")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def _read_segment(path: Path) -> Iterable[dict]:
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):  # torn tail: its append never returned, never acked
                logger.warning("feedback log: skipping a torn line at the end of %s", path.name)
                break
            yield json.loads(line)


def _is_locked(path: Path) -> bool:
    """Whether another open file holds an ``flock`` on ``path`` (its writer is alive)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
