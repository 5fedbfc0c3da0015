"""The Retriever deployment: user ID → top-k item IDs and scores, batched across requests.

Per replica it holds the run's index in memory: item embeddings in an ``ExactRetriever``, user
embeddings and seen sets keyed by raw user ID, and the popularity list for users the model does
not know (cold start: no embedding, so the most popular items, excluding nothing, flagged
``fallback="popularity"``).

Concurrent requests are grouped by ``@serve.batch`` into one [B, D] @ [D, N] search (B <= the
batch size, default 32); requests in a batch may ask for different k, so the batch searches
with the largest k and each request keeps its first k. The torch work runs in a worker thread
(``asyncio.to_thread``) so the replica's event loop keeps accepting and batching requests.
Batch size and wait are live settings (``user_config`` → ``reconfigure``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from ray import serve
from ray.serve.metrics import Histogram

from serving.run_index import Popularity, SeenItems, UserEmbeddings, read_meta
from training.retrieval import PAD_ITEM_ID, ExactRetriever

logger = logging.getLogger("ray.serve")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.005


@dataclass(frozen=True)
class Query:
    """One request to the retriever (already validated by the ingress)."""

    user_id: int
    k: int
    exclude_seen: bool = True


@dataclass(frozen=True)
class Recommendation:
    """The retriever's answer to one ``Query``: up to k items, best first.

    Args:
        item_ids: raw item IDs (fewer than k when the candidates run out; never padding).
        scores: one per item: dot product, or interaction count for the popularity fallback.
        fallback: "popularity" when the user has no embedding, else None.
        search_ms: wall time of the whole batch's search (shared by the batch's requests).
        batch_size: how many requests shared that search.
    """

    item_ids: list[int]
    scores: list[float]
    fallback: Literal["popularity"] | None
    search_ms: float
    batch_size: int


class RetrievalIndex:
    """The in-memory index and the batch search; plain Python so tests can drive it directly.

    Args:
        index_path: a run's ``index/`` folder.
    """

    def __init__(self, index_path: str | Path) -> None:
        index_path = Path(index_path)
        self.meta = read_meta(index_path)
        self.items = ExactRetriever.from_index_dir(index_path)
        self.users = UserEmbeddings.from_parquet(index_path / "users.parquet")
        self.seen = SeenItems.from_parquet(index_path / "seen.parquet")
        self.popularity = Popularity.from_parquet(index_path / "popularity.parquet")

    def search(self, queries: list[Query]) -> list[Recommendation]:
        """Answer a batch: one exact search for the known users, popularity for the others."""
        start = time.perf_counter()
        user_ids = torch.tensor([q.user_id for q in queries], dtype=torch.int64)  # [B]
        user_emb, known = self.users.lookup(user_ids)  # [B, D], [B]
        known_rows = known.nonzero().flatten().tolist()
        answers: dict[int, tuple[list[int], list[float], Literal["popularity"] | None]] = {}
        if known_rows:
            seen = self.seen.for_users(user_ids[known_rows])
            exclude = [
                ids if queries[row].exclude_seen else ids[:0] for row, ids in zip(known_rows, seen)
            ]
            k_max = max(queries[row].k for row in known_rows)
            result = self.items.search(user_emb[known_rows], k_max, exclude)  # [B_known, k_max]
            for i, row in enumerate(known_rows):
                ids = result.item_ids[i, : queries[row].k]
                real = ids != PAD_ITEM_ID
                answers[row] = (ids[real].tolist(), result.scores[i, : queries[row].k][real].tolist(), None)
        for row, query in enumerate(queries):
            if row not in answers:
                ids, counts = self.popularity.top(query.k)
                answers[row] = (ids.tolist(), counts.tolist(), "popularity")
        search_ms = (time.perf_counter() - start) * 1e3
        return [
            Recommendation(*answers[row], search_ms=search_ms, batch_size=len(queries))
            for row in range(len(queries))
        ]

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.meta.version,
            "num_items": self.items.num_items,
            "num_users": len(self.users),
        }


@serve.deployment
class Retriever:
    """Ray Serve deployment wrapping a ``RetrievalIndex``.

    Args:
        index_path: absolute path of the run's ``index/`` folder.
        torch_threads: intra-op threads per replica (replicas share the node's cores).
    """

    def __init__(self, index_path: str, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self._index = RetrievalIndex(index_path)
        self._batch_sizes = Histogram(
            "rayrec_retriever_batch_size",
            description="Requests per batched search.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        logger.info("Retriever loaded %s: %s", index_path, self._index.info())

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Live settings: ``max_batch_size``, ``batch_wait_timeout_s``."""
        self.recommend.set_max_batch_size(int(config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self.recommend.set_batch_wait_timeout_s(
            float(config.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_TIMEOUT_S))
        )

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S)
    async def recommend(self, queries: list[Query]) -> list[Recommendation]:
        self._batch_sizes.observe(len(queries))
        return await asyncio.to_thread(self._index.search, queries)

    def info(self) -> dict[str, Any]:
        return self._index.info()
