"""A small but real run folder: Parquet files laid out as docs/architecture.md specifies.

    <project>/data/toy/items.parquet         titles (one item has none)
    <project>/runs/toy-run/index/            items, users, seen, popularity Parquet + index.json

``index.json``'s ``dataset`` is relative ("data/toy"), as training writes it, so serving has to
resolve it against the project folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

NUM_ITEMS = 300
NUM_USERS = 40
DIM = 16
VERSION = "toy-run/epoch-0003"
UNKNOWN_USER = 987_654_321
UNTITLED_ITEM_ROW = 5  # items.parquet gives this item a null title


@dataclass(frozen=True)
class ToyRun:
    run_dir: Path
    item_ids: np.ndarray  # [N] int64
    item_emb: np.ndarray  # [N, D] float32
    user_ids: np.ndarray  # [U] int64
    user_emb: np.ndarray  # [U, D] float32
    seen: dict[int, set[int]]  # user → items rated
    popular: list[int]  # item IDs by count desc, ties by ID asc
    titles: dict[int, str | None]

    def expected_top(self, user_id: int, k: int, exclude_seen: bool = True) -> list[int]:
        """Brute force in numpy: score desc, ties by item ID."""
        row = int(np.nonzero(self.user_ids == user_id)[0][0])
        scores = self.item_emb @ self.user_emb[row]
        banned = self.seen.get(user_id, set()) if exclude_seen else set()
        keep = np.array([i not in banned for i in self.item_ids.tolist()])
        ids, sc = self.item_ids[keep], scores[keep]
        return ids[np.lexsort((ids, -sc))][:k].tolist()


def _embedding_table(id_name: str, ids: np.ndarray, emb: np.ndarray) -> pa.Table:
    return pa.table(
        {
            id_name: pa.array(ids, pa.int64()),
            "embedding": pa.array(list(emb), pa.list_(pa.float32())),
        }
    )


def write_toy_run(project: Path, seed: int = 0) -> ToyRun:
    rng = np.random.default_rng(seed)
    item_ids = (rng.permutation(NUM_ITEMS) * 7 + 1000).astype(np.int64)  # sparse raw IDs, shuffled
    item_emb = rng.standard_normal((NUM_ITEMS, DIM)).astype(np.float32)
    user_ids = (np.arange(NUM_USERS) * 13 + 5).astype(np.int64)
    user_emb = rng.standard_normal((NUM_USERS, DIM)).astype(np.float32)
    seen = {
        int(u): set(rng.choice(item_ids, size=rng.integers(0, 40), replace=False).tolist())
        for u in user_ids
    }
    seen[int(user_ids[0])] = set()  # a known user with no history
    pairs = [(u, i) for u, items in seen.items() for i in items]
    counts: dict[int, int] = {}
    for _, item in pairs:
        counts[item] = counts.get(item, 0) + 1
    popular = sorted(counts, key=lambda i: (-counts[i], i))

    dataset = project / "data" / "toy"
    dataset.mkdir(parents=True)
    titles: dict[int, str | None] = {int(i): f"Movie {i} (1999)" for i in item_ids}
    titles[int(item_ids[UNTITLED_ITEM_ROW])] = None
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(list(titles), pa.int64()),
                "title": pa.array(list(titles.values()), pa.string()),
                "year": pa.array([1999] * NUM_ITEMS, pa.int32()),
                "genres": pa.array([["Drama"]] * NUM_ITEMS, pa.list_(pa.string())),
            }
        ),
        dataset / "items.parquet",
    )

    run_dir = project / "runs" / "toy-run"
    index = run_dir / "index"
    index.mkdir(parents=True)
    pq.write_table(_embedding_table("item_id", item_ids, item_emb), index / "items.parquet")
    pq.write_table(_embedding_table("user_id", user_ids, user_emb), index / "users.parquet")
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([u for u, _ in pairs], pa.int64()),
                "item_id": pa.array([i for _, i in pairs], pa.int64()),
            }
        ),
        index / "seen.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(popular, pa.int64()),
                "count": pa.array([counts[i] for i in popular], pa.int64()),
            }
        ),
        index / "popularity.parquet",
    )
    (index / "index.json").write_text(
        json.dumps(
            {
                "model": "two_tower",
                "dim": DIM,
                "num_items": NUM_ITEMS,
                "num_users": NUM_USERS,
                "version": VERSION,
                "dataset": "data/toy",
            }
        )
    )
    return ToyRun(run_dir, item_ids, item_emb, user_ids, user_emb, seen, popular, titles)


