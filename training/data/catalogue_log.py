"""Items added to or removed from the served catalogue while it serves: the change and its log.

``POST /items`` and ``DELETE /items/{id}`` (``serving.ingress``) become :class:`ItemChange`
records. The ``HistoryBoard`` (``serving.history_board``) writes each to the catalogue log
before the request is answered and fans it out to every Ingress replica, where
``serving.live_items.LiveCatalogue`` applies it to the served index.

A change carries the item's *content* (title, genres, year: what the run's exported content
encoder reads), not its vectors: each replica encodes it itself, so the log stays small and
readable, is independent of the model that will read it (a later run re-encodes the same
content), and holds what an incremental training job needs to learn the item: ``rayrec train --continue``
reads it (:func:`read_catalogue`) so a continued MFLI run trains the items added live, with
their content, and its export serves them with trained vectors.

It lives in ``training`` because both sides read it (imports go serving → training): serving
writes it, the incremental job reads it.

The log is one JSON-lines file, appended with ``flush`` + ``fsync`` per batch of changes (one
writer: the board has one replica). Replaying it in order gives the catalogue's live state (the
last change of each item wins); a torn last line (a crash inside ``write``) belongs to a change
that was never acknowledged and is skipped. It is never compacted: a line is ~100 bytes, so a
million changes are ~100 MB replayed in seconds at a board restart; compacting it (rewrite the
live state, rename) is the next step if that ever matters.

Example::

    log = CatalogueLog(Path("data/feedback/catalogue/items.jsonl"))
    log.append([ItemChange(9001, "Toy Story (1995)", ("Animation",), 1995), ItemChange.removal(50)])
    live_state(log.read())      # {9001: ItemChange(9001, ...), 50: ItemChange(50, removed=True)}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

logger = logging.getLogger("rayrec.catalogue")

CATALOGUE_DIR = "catalogue"
"""The catalogue log's folder inside a feedback folder (serving's default ``catalogue_dir``)."""
CATALOGUE_FILE = "items.jsonl"


@dataclass(frozen=True)
class ItemChange:
    """One item added (with its content) or removed, as the catalogue log and the board carry it.

    Args:
        item_id: raw item ID (int64).
        title / genres / year: the content the run's content encoder embeds (ignored when removed).
        removed: True: the item leaves the served index.
    """

    item_id: int
    title: str | None = None
    genres: tuple[str, ...] = ()
    year: int | None = None
    removed: bool = False

    @classmethod
    def removal(cls, item_id: int) -> ItemChange:
        return cls(item_id, removed=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> ItemChange:
        fields = json.loads(line)
        return cls(**{**fields, "genres": tuple(fields.get("genres") or ())})


def content_table(changes: list[ItemChange]) -> pa.Table:
    """The added items' content as the content encoder reads it: ``title``, ``year``, ``genres``
    columns, one row per change (``training.models.item_content.content_tokens``)."""
    return pa.table({
        "title": pa.array([c.title for c in changes], pa.string()),
        "year": pa.array([c.year for c in changes], pa.int32()),
        "genres": pa.array([list(c.genres) for c in changes], pa.list_(pa.string())),
    })  # fmt: skip


def live_state(changes: Iterable[ItemChange]) -> dict[int, ItemChange]:
    """Each item's last change, in the order items were first changed (replaying a log)."""
    state: dict[int, ItemChange] = {}
    for change in changes:
        state[change.item_id] = change
    return state


class CatalogueLog:
    """The durable, append-only record of item changes (module docstring).

    Args:
        path: the JSON-lines file (its folder is created).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # end a torn last line so the next change starts a line of its own
                self._write(b"\n")

    def append(self, changes: list[ItemChange]) -> None:
        """Write ``changes`` and ``fsync``: once this returns they survive a crash."""
        if not changes:
            return
        self._write("".join(change.to_json() + "\n" for change in changes).encode())

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> list[ItemChange]:
        """Every acknowledged change, oldest first ([] when the file does not exist yet)."""
        if not self.path.exists():
            return []
        return parse_changes(self.path.read_text(), str(self.path))


def parse_changes(text: str, where: str) -> list[ItemChange]:
    """The changes of a catalogue log's text, oldest first; a torn line (a crash inside a write,
    never acknowledged) is skipped with a warning naming ``where``."""
    changes = []
    for line in text.split("\n"):
        if not line:
            continue
        try:
            changes.append(ItemChange.from_json(line))
        except (json.JSONDecodeError, TypeError):
            logger.warning("CatalogueLog: skipped a torn line in %s", where)
    return changes


def read_catalogue(feedback: str) -> list[ItemChange]:
    """The catalogue log kept in a feedback folder (``<feedback>/catalogue/items.jsonl``, a local
    path or a URI), oldest first; [] when the app never changed its catalogue."""
    from training import storage

    path = storage.join(feedback, CATALOGUE_DIR, CATALOGUE_FILE)
    if not storage.exists(path):
        return []
    return parse_changes(storage.read_bytes(path).decode(), path)
