"""Each user's engagements since the run was exported, as one Ingress replica reads them.

The run's histories (``index/seen.parquet``, the ranker's ``histories.parquet``) are frozen at
export. Engagements acknowledged by ``/feedback`` since then reach every Ingress replica as
*deltas* (``serving.history_board``) that the replica folds into a :class:`LiveHistory` held in
memory, so the request path reads them with no remote call. Retrieval excludes them as seen and
moves the user's query vector towards them (``serving.retriever``), the ranker reads them as the
newest end of the user's history (:class:`RankerHistories`), and ``GET /users/{id}/history``
shows them.

Which events count: :data:`POSITIVE_EVENTS`. A click or an engagement says the user chose the
item, the same evidence a rating gives the training split, so it belongs in the history that
feeds the user tower and in what the user should not be shown again. An impression only says the
item was shown (it would exclude everything ever displayed), so it does not count; neither does
any other kind until someone decides what it means.

Bounded: each user keeps at most ``history_len`` live items (newest kept; an item engaged again
moves to the newest end, not twice), so a replica holds at most users x history_len ids.

Example::

    live = LiveHistory(history_len=3)
    live.apply([HistoryDelta(user_id=7, item_id=10), HistoryDelta(7, 11), HistoryDelta(7, 10)])
    live.items(7)                                   # [11, 10], oldest first
    live.for_users(torch.tensor([7, 8]))            # [tensor([11, 10]), tensor([])]
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

POSITIVE_EVENTS = frozenset({"click", "engagement"})
"""Feedback kinds that join the user's live history (module docstring: why these)."""

DEFAULT_HISTORY_LEN = 50
"""Live items kept per user (the training configs' ``data.history_len``)."""


def is_positive(event: str) -> bool:
    """Whether a feedback event of this kind joins the user's live history."""
    return event in POSITIVE_EVENTS


@dataclass(frozen=True)
class HistoryDelta:
    """One acknowledged engagement: ``user_id`` chose ``item_id``."""

    user_id: int
    item_id: int


class LiveHistory:
    """Per-user live items, oldest first, each user bounded to ``history_len``; plain Python.

    Args:
        history_len: items kept per user (newest kept).

    Not thread safe by itself: the Ingress applies deltas on its event loop and the search
    thread only reads (a read of a user's list concurrent with an append sees the list before
    or after it, both valid).
    """

    def __init__(self, history_len: int = DEFAULT_HISTORY_LEN) -> None:
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        self.history_len = history_len
        self._items: dict[int, tuple[int, ...]] = {}  # user → items, oldest first (immutable: safe to read)

    def __len__(self) -> int:
        """Users with at least one live item."""
        return len(self._items)

    def apply(self, deltas: Iterable[HistoryDelta]) -> None:
        """Append each engagement to its user's history (re-engaging moves the item to the end)."""
        for delta in deltas:
            items = OrderedDict.fromkeys(self._items.get(delta.user_id, ()))
            items.pop(delta.item_id, None)
            items[delta.item_id] = None
            self._items[delta.user_id] = tuple(items)[-self.history_len :]

    def replace(self, deltas: Iterable[HistoryDelta]) -> None:
        """Start over from a full snapshot (the board restarted or this replica fell behind)."""
        self._items = {}
        self.apply(deltas)

    def users(self) -> list[int]:
        """Users with live items."""
        return list(self._items)

    def items(self, user_id: int) -> list[int]:
        """The user's live items, oldest first ([] when none)."""
        return list(self._items.get(user_id, ()))

    def for_users(self, user_ids: torch.Tensor) -> list[torch.Tensor]:
        """``[live item IDs of user b, oldest first, for b in batch]`` ([B] int64 → B tensors)."""
        return [torch.tensor(self._items.get(u, ()), dtype=torch.int64) for u in user_ids.tolist()]


class RankerHistories:
    """The ranker's frozen histories with each user's live items appended (newest last).

    Wraps ``training.data.feature_index.HistoryIndex`` (what ``RankerScorer.inputs`` calls
    ``gather`` on) without changing it: serving swaps it into the loaded scorer, so the ranker's
    history feature (and a synchronous FM reading it, ``fm_mode`` sync) sees what the user
    engaged with since export. The FMWorkers' precomputed FM rows (``fm_mode`` cache) are still
    computed from the frozen histories: those replicas do not follow the board yet.

    Args:
        frozen: the scorer's ``HistoryIndex`` (``gather(users [N]) → [N] list<int64>``).
        live: this replica's :class:`LiveHistory`.
        history_len: the ranker's history window (``ranker.json``'s ``history_len``); the
            joined history keeps its newest ``history_len`` items.
    """

    def __init__(self, frozen, live: LiveHistory, history_len: int) -> None:
        self.frozen = frozen
        self._live = live
        self._history_len = history_len

    def gather(self, users: np.ndarray) -> pa.Array:
        """Histories of ``users`` [N] as [N] list<int64>, frozen then live, oldest first."""
        base = self.frozen.gather(users)
        users = np.asarray(users, dtype=np.int64)
        extra = {int(u): self._live.items(int(u)) for u in np.unique(users)}
        if not any(extra.values()):
            return base
        rows = base.to_pylist()
        joined = [(rows[n] or []) + extra[int(u)] if extra[int(u)] else rows[n] for n, u in enumerate(users)]
        return pa.array([row[-self._history_len :] for row in joined], pa.list_(pa.int64()))
