"""Retrieval: user ID → top-k item IDs and scores, for a batch of requests at once.

Each Ingress replica holds (``serving.ingress``) the run's index in memory: one search backend behind the retriever protocol
(``training.retrieval.protocol``) with its per-user input keyed by raw user ID, the seen sets,
and the popularity list for users the model does not know (cold start: no embedding, so the
most popular items, excluding nothing, flagged ``fallback="popularity"``).

The backend (``serving.run_index.load_backend``) is picked from the run folder: ``auto`` serves
the learned index the run trained, MFLI (beam search over each facet's codes, then exact scoring
of the gathered items; user input [U, D] concatenated facets) or HSNN (beam search down the tree
with the MoNN scorer; user input [U, D + T] packs), and exact search ([B, D] @ [D, N]) for a
two-tower run; ``exact`` forces exact search over ``index/items.parquet`` on any run.

Concurrent requests are grouped by the Ingress into one search (B <= the batch size, default
16; ``serving.batching``); requests in a batch may ask for different k, so the batch searches
with the largest k and each request keeps its first k. The Ingress runs the search in a worker
thread so its event loop keeps accepting requests. Batch size and wait are live settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from serving.run_index import (
    IndexChoice,
    IndexName,
    Popularity,
    SeenItems,
    load_backend,
    read_meta,
)
from training.retrieval import PAD_ITEM_ID
from training.storage import local_path

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.0  # a batch is what queued during the previous one (serving.batching)


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
        scores: one per item: the backend's score (dot product; HSNN: the MoNN score), or
            interaction count for the popularity fallback.
        fallback: "popularity" when the user has no embedding, else None.
        search_ms: wall time of the whole batch's search (shared by the batch's requests).
        batch_size: how many requests shared that search.
        index: the backend that answered ("exact", "mfli", "hsnn"); None for the fallback.
        items_scored: (user, item) scores the batch's search computed, summed over its known
            users (exact search: B x N; a learned index: what its beam reached).
    """

    item_ids: list[int]
    scores: list[float]
    fallback: Literal["popularity"] | None
    search_ms: float
    batch_size: int
    index: IndexName | None = None
    items_scored: int = 0


class RetrievalIndex:
    """The in-memory index and the batch search; plain Python so tests can drive it directly.

    Args:
        index_path: a run's ``index/`` folder.
        index: the backend: ``auto`` (the learned index the run trained, else exact), or
            ``exact``/``mfli``/``hsnn`` by name (a learned index the run lacks is an error).
        beam: overrides the learned index's saved beam width; None keeps the saved one.
    """

    def __init__(self, index_path: str | Path, index: IndexChoice = "auto", beam: int | None = None) -> None:
        index_path = local_path(index_path)  # a URI: this node's copy, fetched once
        self.meta = read_meta(index_path)
        self.backend = load_backend(index_path, self.meta, index, beam)
        self.seen = SeenItems.from_parquet(index_path / "seen.parquet")
        self.popularity = Popularity.from_parquet(index_path / "popularity.parquet")

    def search(self, queries: list[Query]) -> list[Recommendation]:
        """Answer a batch: one backend search for the known users, popularity for the others."""
        start = time.perf_counter()
        user_ids = torch.tensor([q.user_id for q in queries], dtype=torch.int64)  # [B]
        user_input, known = self.backend.users.lookup(user_ids)  # [B, D] (HSNN: [B, D + T]), [B]
        known_rows = known.nonzero().flatten().tolist()
        answers: dict[int, tuple[list[int], list[float], Literal["popularity"] | None]] = {}
        items_scored = 0
        if known_rows:
            seen = self.seen.for_users(user_ids[known_rows])
            exclude = [
                ids if queries[row].exclude_seen else ids[:0] for row, ids in zip(known_rows, seen)
            ]
            k_max = max(queries[row].k for row in known_rows)
            result = self.backend.retriever.search(user_input[known_rows], k_max, exclude)  # [B_known, k_max]
            items_scored = int(result.stats.get("items_scored", 0))
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
            Recommendation(
                *answers[row],
                search_ms=search_ms,
                batch_size=len(queries),
                index=None if answers[row][2] else self.backend.name,
                items_scored=items_scored,
            )
            for row in range(len(queries))
        ]

    def info(self) -> dict[str, Any]:
        """What ``/readyz`` reports: version, sizes, the backend serving and its beam width."""
        return {
            "model_version": self.meta.version,
            "num_items": self.backend.num_items,
            "num_users": len(self.backend.users),
            "index": self.backend.name,
            "beam": self.backend.beam,
        }
