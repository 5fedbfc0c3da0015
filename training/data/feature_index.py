"""Features and histories by raw id, as arrays built once: what a scorer gathers from per call.

Training keeps per-user and per-item features as Arrow tables with list columns
(:class:`training.data.ranking_examples.FeatureTables`), the form it writes to Parquet and joins
onto whole example tables. A list column gives up one row only after the whole column has been
flattened into a matrix, so looking N ids up in the table costs O(rows): for the serving ranker
that was O(catalogue) per request batch (64 pairs, 8 item features: 6.2-7.0 ms per call at
1,000,000 items against 0.43 ms at 200; gathered from these arrays, 0.24 ms at either size,
``tests/training/test_ranker_artifact.py``). These
classes convert once (keys sorted, features as matrices, histories as one contiguous list
array) and then gather per call: a binary search per id and a copy of the N rows,
O(N log R + N · F) whatever R is.

Notation: R rows (users or items) of a table, N ids looked up, F dense features, C cohorts.

Example::

    index = features.index()                              # once, at load
    dense, cohorts = index.assemble(user_ids, item_ids)   # per call: [N, F] float32, [N, C] int64
    history = HistoryIndex.from_table(histories).gather(user_ids)   # [N] list<int64>
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.list_columns import list_matrix


def _positions(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row of each id in ascending ``keys`` [R] (any row when absent) and whether it is there: [N], [N]."""
    pos = np.searchsorted(keys, ids).clip(max=len(keys) - 1)
    return pos, keys[pos] == ids


def _width(column: pa.ChunkedArray) -> int:
    """The fixed width of a list column (0 for an empty table)."""
    return len(column[0]) if len(column) else 0


@dataclass(frozen=True)
class KeyedRows:
    """One feature table as arrays.

    Args:
        keys: ``[R]`` int64 raw ids, ascending.
        dense: ``[R, F]`` float32, row r the features of ``keys[r]``.
        cohorts: ``[R, C]`` int64 bucket ids.
    """

    keys: np.ndarray
    dense: np.ndarray
    cohorts: np.ndarray

    @classmethod
    def from_table(cls, table: pa.Table, key: str) -> KeyedRows:
        """``table``: ``key`` int64, ``dense`` list<float32> [F], ``cohorts`` list<int64> [C], rows in any order."""
        keys = table.column(key).to_numpy()
        order = np.argsort(keys, kind="stable")
        dense = list_matrix(table.column("dense"), _width(table.column("dense")), np.float32)
        cohorts = list_matrix(table.column("cohorts"), _width(table.column("cohorts")), np.int64)
        return cls(keys[order], dense[order], cohorts[order])

    def gather(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids`` [N]: dense ``[N, F]``, cohorts ``[N, C]``; an unknown id gets zero
        features and bucket 0 (a cold id still gets a prediction)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.keys):
            return np.zeros((len(ids), self.dense.shape[1]), np.float32), np.zeros((len(ids), self.cohorts.shape[1]), np.int64)
        pos, found = _positions(self.keys, ids)
        dense, cohorts = self.dense[pos], self.cohorts[pos]  # [N, F], [N, C]: copies of N rows
        dense[~found], cohorts[~found] = 0.0, 0
        return dense, cohorts


@dataclass(frozen=True)
class FeatureIndex:
    """Per-user and per-item features ready for lookup (:meth:`FeatureTables.index`).

    Args:
        users: the user table's rows; items: the item table's.
    """

    users: KeyedRows
    items: KeyedRows

    def assemble(self, user_ids: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of each (user, item) pair, ``[N]`` ids each: dense ``[N, Fu + Fi]`` float32 and
        cohorts ``[N, Cu + Ci]`` int64, user columns first (``FeatureTables.dense_names`` order)."""
        u_dense, u_cohorts = self.users.gather(user_ids)
        i_dense, i_cohorts = self.items.gather(item_ids)
        return np.concatenate([u_dense, i_dense], axis=1), np.concatenate([u_cohorts, i_cohorts], axis=1)


@dataclass(frozen=True)
class HistoryIndex:
    """Each user's history ready for lookup.

    Args:
        keys: ``[U]`` int64 user ids, ascending.
        histories: ``[U]`` list<int64>, one contiguous array, row u the history of ``keys[u]``.
    """

    keys: np.ndarray
    histories: pa.Array

    @classmethod
    def from_table(cls, table: pa.Table) -> HistoryIndex:
        """``table``: ``user_id`` int64, ``history`` list<int64> (``training.data.loader.user_histories``)."""
        keys = table.column("user_id").to_numpy()
        order = np.argsort(keys, kind="stable")
        return cls(keys[order], table.column("history").combine_chunks().take(pa.array(order)))

    def gather(self, users: np.ndarray) -> pa.Array:
        """Histories of ``users`` [N] as ``[N]`` list<int64>; a user without one gets an empty list."""
        users = np.asarray(users, dtype=np.int64)
        empty = pa.array([[]] * len(users), pa.list_(pa.int64()))
        if not len(self.keys):
            return empty
        pos, found = _positions(self.keys, users)
        return pc.if_else(pa.array(found), self.histories.take(pa.array(pos)), empty)
