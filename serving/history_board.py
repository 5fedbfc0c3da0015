"""The HistoryBoard deployment: acknowledged engagements, fanned out to every Ingress replica.

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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from serving.feedback_log import read_acknowledged
from serving.live_history import DEFAULT_HISTORY_LEN, HistoryDelta, LiveHistory, is_positive

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_DELTAS = 100_000
"""Deltas kept for replicas catching up (a replica further behind takes a snapshot)."""
DEFAULT_WAIT_S = 1.0
"""How long a long poll waits for news before answering with none."""


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
        deltas: oldest first.
        snapshot: True: ``deltas`` are every user's whole live history (replace, not apply).
    """

    epoch: str
    cursor: int
    deltas: list[HistoryDelta]
    snapshot: bool


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)
class HistoryBoard:
    """Numbered engagement deltas and every user's live history; see the module docstring.

    Args:
        log_dir: the feedback log folder to rebuild from at start (None: start empty).
        history_len: live items kept per user.
        max_deltas: deltas kept for replicas catching up.
        wait_s: the longest a :meth:`since` call waits for news.
    """

    def __init__(self, log_dir: str | None = None, history_len: int = DEFAULT_HISTORY_LEN,
                 max_deltas: int = DEFAULT_MAX_DELTAS, wait_s: float = DEFAULT_WAIT_S) -> None:  # fmt: skip
        self.epoch = uuid.uuid4().hex[:12]
        self._live = LiveHistory(history_len)
        self._log: deque[tuple[int, HistoryDelta]] = deque(maxlen=max_deltas)
        self._cursor = 0
        self._ids: OrderedDict[str, None] = OrderedDict()  # recent event ids, for dedupe
        self._max_ids = max_deltas
        self._wait_s = wait_s
        self._news = asyncio.Event()
        if log_dir is not None and Path(log_dir).is_dir():
            self._rebuild(Path(log_dir))

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

    async def publish(self, events: list[Published]) -> int:
        """Record acknowledged positive events (the sink filters them); returns how many were new."""
        added = self._record(events)
        if added:
            self._news.set()
            self._news = asyncio.Event()  # waiters hold the one just set
        return added

    async def since(self, epoch: str, cursor: int) -> BoardUpdate:
        """Deltas after ``cursor`` of ``epoch``; waits up to ``wait_s`` when there are none yet.

        A caller of another epoch (the board restarted, or a new replica sends ``""``) or one
        behind the oldest kept delta gets a snapshot instead.
        """
        if epoch == self.epoch and cursor == self._cursor:
            news = self._news
            try:
                await asyncio.wait_for(news.wait(), timeout=self._wait_s)
            except TimeoutError:
                return BoardUpdate(self.epoch, cursor, [], snapshot=False)
        oldest = self._log[0][0] if self._log else self._cursor + 1
        if epoch != self.epoch or cursor < oldest - 1 or cursor > self._cursor:
            return BoardUpdate(self.epoch, self._cursor, self.snapshot(), snapshot=True)
        start = len(self._log) - (self._cursor - cursor)  # the first delta newer than cursor
        deltas = [delta for _, delta in itertools.islice(self._log, start, None)]
        return BoardUpdate(self.epoch, self._cursor, deltas, snapshot=False)

    def snapshot(self) -> list[HistoryDelta]:
        """Every user's live history as deltas, each user's oldest first."""
        return [HistoryDelta(user, item) for user in self._live.users() for item in self._live.items(user)]

    def history(self, user_id: int) -> list[int]:
        """One user's live items, oldest first (tests and tools)."""
        return self._live.items(user_id)
