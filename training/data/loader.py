"""From interaction rows to KeyedJaggedTensor batches: the data path's last step.

Two pieces:

* :func:`build_examples` cuts training examples from interactions: each interaction
  (user, item, t) becomes one example whose ``history`` feature is the user's previous
  ``history_len`` items (strictly before it in time). Vectorised over a whole Arrow table, so it
  runs as a Ray Data ``map_groups`` UDF per user group or over a whole table at once.
* :func:`build_sequence_examples` cuts the same interactions into per-user windows for
  all-position (SASRec) training: ``history`` is a window of a user's items and ``item_id`` the
  list of the items that follow each of them, so every train interaction but a user's first is a
  target exactly once.
* :func:`to_kjt` turns an Arrow batch of examples into a ``KeyedJaggedTensor`` with keys
  ``user_id`` (1 per row), ``item_id`` (1 per row) and ``history`` (jagged) with no Python loop:
  the list column's offsets give the lengths and its flattened values the ids.

Notation: B rows in a batch, H_b history length of row b, L = history_len.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

FEATURES: tuple[str, ...] = ("user_id", "item_id", "history")


def _windows(group_start: np.ndarray, row: np.ndarray, history_len: int) -> tuple[np.ndarray, np.ndarray]:
    """For sorted rows, [start, end) of each row's preceding window within its group."""
    start = np.maximum(group_start, row - history_len)
    return start, row


def _gather_windows(values: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ``values[start[i]:end[i]]`` for every i into (offsets [B+1], flat values)."""
    lengths = end - start
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    # index of each output element: its window start + its position inside the window
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(total) - offsets[:-1][row_of]
    return offsets, values[start[row_of] + pos]


def _time_ordered(table: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``table`` sorted by (user_id, timestamp, item_id) and, per row ``[N]``: its user, its item,
    whether it opens its user's run of rows, and the index of that run's first row."""
    table = table.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("item_id", "ascending")])
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy().astype(np.int64, copy=False)
    new_group = np.ones(len(users), dtype=bool)
    new_group[1:] = users[1:] != users[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(len(users)), 0))
    return table, users, items, new_group, group_start


def build_examples(table: pa.Table, history_len: int) -> pa.Table:
    """Interactions (user_id, item_id, timestamp, ...) → examples with a ``history`` list.

    Rows are ordered by (user_id, timestamp, item_id); a row's history is the user's previous
    ``history_len`` items, oldest first. Input columns other than the three are kept.

    Returns:
        The sorted table with an extra ``history: list<int64>`` column.
    """
    if table.num_rows == 0:
        return table.append_column("history", pa.array([], type=pa.list_(pa.int64())))
    table, users, items, new_group, group_start = _time_ordered(table)
    row = np.arange(len(users))
    start, end = _windows(group_start, row, history_len)
    offsets, flat = _gather_windows(items, start, end)
    history = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(flat, type=pa.int64()))
    return table.append_column("history", history)


def build_sequence_examples(table: pa.Table, window: int) -> pa.Table:
    """Interactions → one example per window of ``window`` consecutive targets of a user.

    A user's items in time order, i_0 … i_{L-1}, are cut from the end into windows: the last
    has inputs ``history = [i_{L-1-w}, …, i_{L-2}]`` and targets ``item_id = [i_{L-w}, …, i_{L-1}]``
    (target j follows input j), the one before it ends where this one starts, and the oldest
    may be shorter. Cutting from the end gives the most recent targets (closest to valid/test in
    time) a full window of context. Users with one item have no target and no example.

    Returns:
        ``user_id`` int64, ``item_id`` list<int64> and ``history`` list<int64> of equal lengths.
    """
    empty = pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.list_(pa.int64())),
                      "history": pa.array([], pa.list_(pa.int64()))})
    if table.num_rows == 0:
        return empty
    table, users, items, new_group, group_start = _time_ordered(table)
    row = np.arange(len(users))
    last = np.ones(len(users), dtype=bool)
    last[:-1] = new_group[1:]
    group_end = np.minimum.accumulate(np.where(last, row, len(users))[::-1])[::-1] + 1  # [N] one past the user's last row
    # windows counted from each user's last row: row r is in window (group_end - 1 - r) // window
    from_end = group_end - 1 - row
    opens = (row > group_start) & ((from_end % window == window - 1) | (row == group_start + 1))
    start = np.flatnonzero(opens)  # first (oldest) target row of each window
    if not len(start):
        return empty
    end = group_end[start] - (from_end[start] // window) * window  # one past its last target row
    t_offsets, targets = _gather_windows(items, start, end)
    h_offsets, inputs = _gather_windows(items, start - 1, end - 1)
    return pa.table({
        "user_id": pa.array(users[start], pa.int64()),
        "item_id": pa.ListArray.from_arrays(pa.array(t_offsets, pa.int32()), pa.array(targets, pa.int64())),
        "history": pa.ListArray.from_arrays(pa.array(h_offsets, pa.int32()), pa.array(inputs, pa.int64())),
    })


def user_histories(table: pa.Table, history_len: int) -> pa.Table:
    """Each user's last ``history_len`` items of ``table`` (oldest first): ``user_id, history``."""
    if table.num_rows == 0:
        return pa.table({"user_id": pa.array([], pa.int64()), "history": pa.array([], pa.list_(pa.int64()))})
    _, users, items, new_group, _ = _time_ordered(table)
    last = np.ones(len(users), dtype=bool)
    last[:-1] = new_group[1:]
    end = np.flatnonzero(last) + 1
    first = np.concatenate([[0], end[:-1]])
    start = np.maximum(first, end - history_len)
    offsets, flat = _gather_windows(items, start, end)
    return pa.table(
        {
            "user_id": pa.array(users[end - 1], pa.int64()),
            "history": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.int64())),
        }
    )


@dataclass
class LogQ:
    """Log sampling probability of each item under in-batch sampling (its train frequency).

    Used for the log-q correction of in-batch softmax (Yi et al., RecSys 2019): popular items
    appear as negatives more often, so their logits are lowered by log q.

    Args:
        item_ids: sorted raw item ids [N].
        log_q: log frequency of each [N]; unseen items get the smallest value.
    """

    item_ids: torch.Tensor
    log_q: torch.Tensor

    @classmethod
    def from_interactions(cls, item_column: pa.ChunkedArray | pa.Array) -> "LogQ":
        counts = pc.value_counts(item_column)
        ids = counts.field("values").to_numpy().astype(np.int64)
        n = counts.field("counts").to_numpy().astype(np.float64)
        order = np.argsort(ids)
        log_q = np.log(n[order] / n.sum())
        return cls(torch.from_numpy(ids[order]), torch.from_numpy(log_q.astype(np.float32)))

    def __call__(self, item_ids: torch.Tensor) -> torch.Tensor:
        """log q of each id in ``item_ids`` [B] → [B] float32."""
        pos = torch.searchsorted(self.item_ids, item_ids).clamp(max=len(self.item_ids) - 1)
        found = self.item_ids[pos] == item_ids
        floor = self.log_q.min() if len(self.log_q) else torch.tensor(0.0)
        return torch.where(found, self.log_q[pos], floor)


def _int64(array: pa.ChunkedArray | pa.Array) -> torch.Tensor:
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return torch.from_numpy(array.to_numpy(zero_copy_only=False).astype(np.int64, copy=True))


def to_kjt(
    batch: pa.Table,
    keys: Sequence[str] = FEATURES,
    present: Optional[Sequence[str]] = None,
) -> KeyedJaggedTensor:
    """An Arrow batch → KJT with every key in ``keys``.

    Keys not in ``present`` (default: all) get zero-length lists, so a sharded collection
    always sees the full key set (item-only or user-only forward passes during eval).

    Args:
        batch: B rows with ``user_id`` int64, ``item_id`` int64 and/or ``history`` list<int64>.
        keys: the KJT's keys, in the order the model's tables were built with.
        present: keys filled from ``batch``.
    """
    present = set(keys if present is None else present)
    b = batch.num_rows
    values, lengths = [], []
    for key in keys:
        if key not in present:
            lengths.append(torch.zeros(b, dtype=torch.int32))
            continue
        column = batch.column(key)
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
            lengths.append(torch.from_numpy(pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int32)))
            values.append(_int64(pc.list_flatten(column)))
        else:
            lengths.append(torch.ones(b, dtype=torch.int32))
            values.append(_int64(column))
    return KeyedJaggedTensor(
        keys=list(keys),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
        lengths=torch.cat(lengths),
    )
