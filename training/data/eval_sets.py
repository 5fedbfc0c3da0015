"""Leave-one-out evaluation sets: which users, their input history, their held-out item, what to mask.

Built once on the driver from the Parquet splits and shipped to every worker (identical on all
ranks), so collective evaluation needs no extra data loading on the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from training.data.loader import user_histories


@dataclass
class EvalUsers:
    """One leave-one-out evaluation set, identical on every rank.

    ``histories``: user_id + history (the model's input); ``targets``: held-out item per
    user; ``seen``: user_id → items to mask (everything before the target).
    """

    histories: pa.Table
    targets: np.ndarray
    seen: list[np.ndarray]


def read_split(data: Path, split: str) -> pa.Table:
    from training.data.schema import INTERACTIONS_SCHEMA, read_parquet_checked

    return read_parquet_checked(data / "interactions" / f"{split}.parquet", INTERACTIONS_SCHEMA)


def _seen_lists(seen: pa.Table, users: np.ndarray) -> list[np.ndarray]:
    """Items each of ``users`` has in ``seen`` (vectorised group-by, one array per user)."""
    s = seen.select(["user_id", "item_id"]).sort_by("user_id")
    su = s.column("user_id").to_numpy()
    si = s.column("item_id").to_numpy()
    lo = np.searchsorted(su, users, side="left")
    hi = np.searchsorted(su, users, side="right")
    return [si[a:b] for a, b in zip(lo, hi)]


def make_eval_users(before: pa.Table, target: pa.Table, history_len: int, max_users: Optional[int], seed: int) -> EvalUsers:
    """Users of ``target`` (one row each), with histories and seen items from ``before``."""
    target = target.sort_by("user_id")
    if max_users is not None and target.num_rows > max_users:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(target.num_rows, size=max_users, replace=False))
        target = target.take(pa.array(keep))
    users = target.column("user_id").to_numpy()
    hist = user_histories(before, history_len)
    # users with no prior interaction get an empty history
    hist_users = hist.column("user_id").to_numpy()
    pos = np.searchsorted(hist_users, users).clip(max=max(len(hist_users) - 1, 0))
    has = (len(hist_users) > 0) & (hist_users[pos] == users) if len(hist_users) else np.zeros(len(users), bool)
    histories = [hist.column("history")[int(p)].as_py() if h else [] for p, h in zip(pos, has)]
    table = pa.table({"user_id": pa.array(users, pa.int64()), "history": pa.array(histories, pa.list_(pa.int64()))})
    return EvalUsers(table, target.column("item_id").to_numpy(), _seen_lists(before, users))
