"""The HistoryBoard deployment: acknowledged engagements and catalogue changes, fanned out to
every Ingress replica.

A ``/feedback`` POST may land on Ingress replica A and the user's next ``/recommend`` on replica
B, so an engagement must reach every replica. Asking a shared store on each request would add a
remote hop to the request path; instead the FeedbackSink publishes each acknowledged positive
event (``serving.live_history.POSITIVE_EVENTS``) here, fire and forget, right after its fsync,
and each Ingress replica follows the board with a *long poll* (:meth:`HistoryBoard.since`
answers at once when something newer is there, else waits up to ``wait_s`` for it) and folds
the deltas into its in-memory ``LiveHistory``. A delta thus reaches every replica one hop after
the ack, and an idle app makes one call per replica every ``wait_s``.

State: a numbered log of recent deltas (``max_deltas``, oldest dropped) plus every user's live
history (what a replica that fell behind, or is new, gets as a full snapshot). One replica, never
autoscaled: two would each hold half the deltas. Restart: the board starts a new ``epoch`` (the
replicas see it and take a snapshot) and rebuilds its histories from the feedback log, compacted
parts and write-ahead segments alike (``serving.feedback_log.read_acknowledged``), so an
acknowledged engagement survives a board restart; one published while the board was down is in
the log and in that rebuild.

Delivery is at least once and idempotent: an ``event_id`` the board has seen (a client's retry)
is dropped, and re-applying an engagement only moves the item to the newest end.

Catalogue changes (``training.data.catalogue_log.ItemChange``: an item added from its content, or
removed) travel the same way, in the same numbered log: :meth:`HistoryBoard.publish_items`
writes them to the catalogue log (fsync) first, so a change is durable before anyone sees it;
a snapshot carries each changed item's last change; a restarted board replays the catalogue log.
Because a replica's ``since`` call says how far it has applied the log (``cursor``, with its
``follower`` name), :meth:`HistoryBoard.wait_applied` can tell the Ingress that took ``POST
/items`` when every replica following the board has the change, so the answer to the POST means
"the next request finds it, on any replica".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from training.data.catalogue_log import CatalogueLog, ItemChange, live_state
from serving.feedback_log import read_acknowledged
from serving.live_history import DEFAULT_HISTORY_LEN, HistoryDelta, LiveHistory, is_positive

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_DELTAS = 100_000
"""Deltas kept for replicas catching up (a replica further behind takes a snapshot)."""
DEFAULT_WAIT_S = 1.0
"""How long a long poll waits for news before answering with none."""
FOLLOWER_TTL_WAITS = 3
"""A follower silent for this many ``wait_s`` (plus 2 s) is taken for gone by :meth:`HistoryBoard.wait_applied`."""

Delta = HistoryDelta | ItemChange
"""One entry of the board's log: an engagement or a catalogue change."""


@dataclass(frozen=True)
class Published:
    """One acknowledged event as the sink publishes it."""

    event_id: str
    user_id: int
    item_id: int


@dataclass(frozen=True)
class BoardUpdate:
    """The answer to :meth:`HistoryBoard.since`.

    Args:
        epoch: the board's incarnation; a replica whose epoch differs has a snapshot coming.
        cursor: the number of the last delta included (ask for newer ones next).
        deltas: oldest first: engagements (``HistoryDelta``) and catalogue changes (``ItemChange``).
        snapshot: True: ``deltas`` are every user's whole live history and every changed item's
            last change (replace, not apply).
    """

    epoch: str
    cursor: int
    deltas: list[Delta]
    snapshot: bool

    def histories(self) -> list[HistoryDelta]:
        return [d for d in self.deltas if isinstance(d, HistoryDelta)]

    def items(self) -> list[ItemChange]:
        return [d for d in self.deltas if isinstance(d, ItemChange)]


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class HistoryBoard:
    """Numbered engagement deltas and catalogue changes, every user's live history and every
    changed item's last change; see the module docstring.

    Args:
        log_dir: the feedback log folder to rebuild from at start (None: start empty).
        history_len: live items kept per user.
        max_deltas: deltas kept for replicas catching up.
        wait_s: the longest a :meth:`since` call waits for news.
        catalogue_path: the catalogue log file (``training.data.catalogue_log``) to replay at start and
            append item changes to (None: :meth:`publish_items` is refused).
    """

    def __init__(self, log_dir: str | None = None, history_len: int = DEFAULT_HISTORY_LEN,
                 max_deltas: int = DEFAULT_MAX_DELTAS, wait_s: float = DEFAULT_WAIT_S,
                 catalogue_path: str | None = None) -> None:  # fmt: skip
        self.epoch = uuid.uuid4().hex[:12]
        self._live = LiveHistory(history_len)
        self._log: deque[tuple[int, Delta]] = deque(maxlen=max_deltas)
        self._cursor = 0
        self._ids: OrderedDict[str, None] = OrderedDict()  # recent event ids, for dedupe
        self._max_ids = max_deltas
        self._wait_s = wait_s
        self._news = asyncio.Event()
        self._items: dict[int, ItemChange] = {}  # each changed item's last change
        self._catalogue = CatalogueLog(catalogue_path) if catalogue_path is not None else None
        self._writing = asyncio.Lock()  # the catalogue log's order is the board's order
        self._followers: dict[str, tuple[str, int, float]] = {}  # name → (epoch, cursor applied, when)
        self._progress = asyncio.Event()  # set when a follower reports progress
        if log_dir is not None and Path(log_dir).is_dir():
            self._rebuild(Path(log_dir))
        if self._catalogue is not None:
            replayed = self._catalogue.read()
            self._record_items(list(live_state(replayed).values()))
            if replayed:
                logger.info("HistoryBoard: replayed %d catalogue changes (%d items)", len(replayed), len(self._items))

    def _rebuild(self, log_dir: Path) -> None:
        table = read_acknowledged(log_dir).select(["event_id", "user_id", "item_id", "event"])
        positives = [Published(e["event_id"], e["user_id"], e["item_id"]) for e in table.to_pylist() if is_positive(e["event"])]
        self._record(positives)
        if positives:
            logger.info("HistoryBoard: rebuilt %d live histories from %d logged engagements", len(self._live), len(positives))

    def _record(self, events: list[Published]) -> int:
        fresh = []
        for e in events:
            if e.event_id in self._ids:
                continue
            self._ids[e.event_id] = None
            if len(self._ids) > self._max_ids:
                self._ids.popitem(last=False)
            self._cursor += 1
            delta = HistoryDelta(e.user_id, e.item_id)
            self._log.append((self._cursor, delta))
            fresh.append(delta)
        self._live.apply(fresh)
        return len(fresh)

    def _record_items(self, changes: list[ItemChange]) -> None:
        for change in changes:
            self._cursor += 1
            self._log.append((self._cursor, change))
            self._items[change.item_id] = change

    def _wake(self) -> None:
        self._news.set()
        self._news = asyncio.Event()  # waiters hold the one just set

    async def publish(self, events: list[Published]) -> int:
        """Record acknowledged positive events (the sink filters them); returns how many were new."""
        added = self._record(events)
        if added:
            self._wake()
        return added

    async def publish_items(self, changes: list[ItemChange]) -> int:
        """Make catalogue changes durable (the catalogue log, fsync), then fan them out.

        Returns the cursor of the last one: :meth:`wait_applied` with it tells when every
        replica has them. Raises RuntimeError on a board without a catalogue log.
        """
        if self._catalogue is None:
            raise RuntimeError("this HistoryBoard keeps no catalogue log (catalogue_path)")
        async with self._writing:
            await asyncio.to_thread(self._catalogue.append, changes)
            self._record_items(changes)
        self._wake()
        return self._cursor

    async def wait_applied(self, cursor: int, timeout_s: float) -> tuple[int, int]:
        """Wait until every live follower applied the log up to ``cursor`` (at most ``timeout_s``).

        Returns ``(followers that have, live followers)``. A follower is live while it polled
        within ``FOLLOWER_TTL_WAITS`` long polls; one that stopped (a killed replica) drops out
        after that, so a dead replica delays an answer by at most that, never forever.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            applied, live = self._applied(cursor)
            left = deadline - time.monotonic()
            if applied == live or left <= 0:
                return applied, live
            progress = self._progress
            try:
                await asyncio.wait_for(progress.wait(), timeout=min(left, self._wait_s))
            except TimeoutError:
                pass

    def _applied(self, cursor: int) -> tuple[int, int]:
        ttl = FOLLOWER_TTL_WAITS * self._wait_s + 2.0
        now = time.monotonic()
        live = {name: seen for name, seen in self._followers.items() if now - seen[2] <= ttl}
        self._followers = live
        return sum(epoch == self.epoch and done >= cursor for epoch, done, _ in live.values()), len(live)

    async def since(self, epoch: str, cursor: int, follower: str = "") -> BoardUpdate:
        """Deltas after ``cursor`` of ``epoch``; waits up to ``wait_s`` when there are none yet.

        A caller of another epoch (the board restarted, or a new replica sends ``""``) or one
        behind the oldest kept delta gets a snapshot instead. ``follower`` (a replica's name)
        says the caller has applied everything up to ``cursor`` (:meth:`wait_applied` reads it).
        """
        if follower:
            self._followers[follower] = (epoch, cursor, time.monotonic())
            self._progress.set()
            self._progress = asyncio.Event()
        if epoch == self.epoch and cursor == self._cursor:
            news = self._news
            try:
                await asyncio.wait_for(news.wait(), timeout=self._wait_s)
            except TimeoutError:
                if follower:  # still following: a long poll that waited counts as a sign of life
                    self._followers[follower] = (epoch, cursor, time.monotonic())
                return BoardUpdate(self.epoch, cursor, [], snapshot=False)
        oldest = self._log[0][0] if self._log else self._cursor + 1
        if epoch != self.epoch or cursor < oldest - 1 or cursor > self._cursor:
            return BoardUpdate(self.epoch, self._cursor, self.snapshot(), snapshot=True)
        start = len(self._log) - (self._cursor - cursor)  # the first delta newer than cursor
        deltas = [delta for _, delta in itertools.islice(self._log, start, None)]
        return BoardUpdate(self.epoch, self._cursor, deltas, snapshot=False)

    def snapshot(self) -> list[Delta]:
        """Every user's live history as deltas, each user's oldest first, then every changed
        item's last change."""
        histories: list[Delta] = [HistoryDelta(user, item) for user in self._live.users() for item in self._live.items(user)]
        return histories + list(self._items.values())

    def history(self, user_id: int) -> list[int]:
        """One user's live items, oldest first (tests and tools)."""
        return self._live.items(user_id)

    def items(self) -> list[ItemChange]:
        """Every changed item's last change (tests and tools)."""
        return list(self._items.values())
