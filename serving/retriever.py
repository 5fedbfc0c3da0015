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

Live histories (``serving.live_history``): with a ``LiveHistory``, items a user clicked or
engaged with since export are excluded like seen items, and, on the exact backend, move the
user's query towards them: ``u' = |u| · normalize((1 - a) · u/|u| + a · m)`` with ``m`` the
normalised mean of those items' vectors and ``a = L / (H + L)`` for L live and H frozen history
items (H capped at the history length): the share a mean-pooled history tower gives them. This
is the retrieval space's stand-in for re-running the user tower (the index holds the tower's
outputs, not the tower); a learned index (MFLI, HSNN) gets the exclusion only. A user the model
does not know but who has live items is searched from ``m`` alone (``fallback="live_history"``:
items near what they engaged with, not ranked); without item vectors to do that, the popularity
fallback minus the items they engaged with.

Live catalogue changes (``serving.live_items``): an index that takes items without a rebuild
(MFLI: :meth:`RetrievalIndex.add_items`, :meth:`RetrievalIndex.remove_items`) is edited in
place between searches (one lock: a search never sees half an edit); a removed item also leaves
the popularity fallback.

Concurrent requests are grouped by the Ingress into one search (B <= the batch size, default
16; ``serving.batching``); requests in a batch may ask for different k, so the batch searches
with the largest k and each request keeps its first k. The Ingress runs the search in a worker
thread so its event loop keeps accepting requests. Batch size and wait are live settings.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from serving.live_history import LiveHistory
from serving.run_index import (
    IndexChoice,
    IndexName,
    Popularity,
    SeenItems,
    UserEmbeddings,
    load_backend,
    read_meta,
)
from training.retrieval import PAD_ITEM_ID, read_embedding_table
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
        fallback: "popularity" when the user has no embedding; "live_history" when they have
            none but engaged with items since export (searched from those); else None.
        search_ms: wall time of the whole batch's search (shared by the batch's requests).
        batch_size: how many requests shared that search.
        index: the backend that answered ("exact", "mfli", "hsnn"); None for the fallback.
        items_scored: (user, item) scores the batch's search computed, summed over its known
            users (exact search: B x N; a learned index: what its beam reached).
    """

    item_ids: list[int]
    scores: list[float]
    fallback: Literal["popularity", "live_history"] | None
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
        ttt: HSNN's test-time training per request (``run_index.load_backend``).
        live: the replica's live histories (None: histories frozen at export).
    """

    def __init__(self, index_path: str | Path, index: IndexChoice = "auto", beam: int | None = None,
                 live: LiveHistory | None = None, ttt: bool = False) -> None:  # fmt: skip
        index_path = local_path(index_path)  # a URI: this node's copy, fetched once
        self.index_path = index_path
        self.meta = read_meta(index_path)
        self.backend = load_backend(index_path, self.meta, index, beam, ttt)
        self.seen = SeenItems.from_parquet(index_path / "seen.parquet")
        self.popularity = Popularity.from_parquet(index_path / "popularity.parquet")
        self.live = live
        # [N, D] item vectors by raw ID, to move a query towards live items (exact search only:
        # its items and users share one space). A second copy of items.parquet: the retriever
        # keeps its own private, sorted for search; N x D float32 (ml-100k: 0.4 MB).
        self.item_vectors: UserEmbeddings | None = None
        if live is not None and self.backend.name == "exact":
            self.item_vectors = UserEmbeddings(*read_embedding_table(index_path / "items.parquet", "item_id"))
        self.removed: set[int] = set()  # items removed live: kept out of the popularity fallback too
        self._removed = torch.empty(0, dtype=torch.int64)  # [R] the same, for torch.isin
        self._lock = threading.Lock()  # searches and catalogue edits take turns

    @property
    def editable(self) -> bool:
        """Whether the backend takes items and removals in place (MFLI)."""
        return hasattr(self.backend.retriever, "add_items") and hasattr(self.backend.retriever, "remove_items")

    def serves(self, item_id: int) -> bool:
        """Whether the item is in the served index now (an editable backend; else False)."""
        return self.editable and item_id in self.backend.retriever

    def add_items(self, item_ids: torch.Tensor, vectors: dict[str, torch.Tensor]) -> None:
        """Index items ``[N]`` with their facet vectors (facet → ``[N, D_f]``), replacing any
        already there; between searches."""
        with self._lock:
            self.backend.retriever.add_items(item_ids, vectors)
            self._set_removed(self.removed - set(item_ids.tolist()))

    def remove_items(self, item_ids: torch.Tensor) -> int:
        """Drop items ``[N]`` from the index and the popularity fallback; returns how many the
        index held."""
        with self._lock:
            removed = self.backend.retriever.remove_items(item_ids)
            self._set_removed(self.removed | set(item_ids.tolist()))
        return removed

    def _set_removed(self, removed: set[int]) -> None:
        self.removed = removed
        self._removed = torch.tensor(sorted(removed), dtype=torch.int64)

    def search(self, queries: list[Query]) -> list[Recommendation]:
        """Answer a batch: one backend search for the users it can personalise (known, or known
        only through live items), popularity for the others."""
        with self._lock:
            return self._search(queries)

    def _search(self, queries: list[Query]) -> list[Recommendation]:
        start = time.perf_counter()
        user_ids = torch.tensor([q.user_id for q in queries], dtype=torch.int64)  # [B]
        user_input, known = self.backend.users.lookup(user_ids)  # [B, D] (HSNN: [B, D + T]), [B]
        seen = self.seen.for_users(user_ids)  # B tensors
        live = self.live.for_users(user_ids) if self.live is not None else [seen[0][:0]] * len(queries)
        live_only = torch.zeros(len(queries), dtype=torch.bool)  # [B] searched from live items alone
        if any(items.numel() for items in live):
            user_input, live_only = self._toward_live(user_input, known, seen, live)
        searched_rows = (known | live_only).nonzero().flatten().tolist()
        answers: dict[int, tuple[list[int], list[float], Literal["popularity", "live_history"] | None]] = {}
        items_scored = 0
        if searched_rows:
            exclude = [
                torch.cat([seen[row], live[row]]) if queries[row].exclude_seen else seen[row][:0] for row in searched_rows
            ]
            k_max = max(queries[row].k for row in searched_rows)
            result = self.backend.retriever.search(user_input[searched_rows], k_max, exclude)  # [B_searched, k_max]
            items_scored = int(result.stats.get("items_scored", 0))
            for i, row in enumerate(searched_rows):
                ids = result.item_ids[i, : queries[row].k]
                real = ids != PAD_ITEM_ID
                fallback = "live_history" if bool(live_only[row]) else None
                answers[row] = (ids[real].tolist(), result.scores[i, : queries[row].k][real].tolist(), fallback)
        for row, query in enumerate(queries):
            if row not in answers:
                answers[row] = (*self._popular(query.k, live[row]), "popularity")
        search_ms = (time.perf_counter() - start) * 1e3
        return [
            Recommendation(
                *answers[row],
                search_ms=search_ms,
                batch_size=len(queries),
                index=None if answers[row][2] == "popularity" else self.backend.name,
                items_scored=items_scored,
            )
            for row in range(len(queries))
        ]

    def _toward_live(
        self, user_input: torch.Tensor, known: torch.Tensor, seen: list[torch.Tensor], live: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries moved towards each user's live items (module docstring): ([B, D], live_only [B])."""
        live_only = torch.zeros_like(known)
        if self.item_vectors is None:
            return user_input, live_only
        history_len = self.live.history_len if self.live is not None else 1
        out = user_input.clone()
        for b, items in enumerate(live):
            if items.numel() == 0:
                continue
            vectors, found = self.item_vectors.lookup(items)  # [L, D], [L]
            if not bool(found.any()):
                continue
            toward = F.normalize(vectors[found].mean(0), dim=0)  # [D]
            if bool(known[b]):
                n_live, n_frozen = int(found.sum()), min(seen[b].numel(), history_len)
                share = n_live / (n_live + n_frozen)
                norm = user_input[b].norm().clamp_min(1e-12)
                out[b] = norm * F.normalize((1 - share) * user_input[b] / norm + share * toward, dim=0)
            else:
                out[b] = toward
                live_only[b] = True
        return out, live_only

    def _popular(self, k: int, live: torch.Tensor) -> tuple[list[int], list[float]]:
        """The k most popular items, minus those the user engaged with live and those removed."""
        drop = torch.cat([live, self._removed]) if self._removed.numel() else live
        ids, counts = self.popularity.top(k + drop.numel())
        if drop.numel():
            keep = ~torch.isin(ids, drop)
            ids, counts = ids[keep], counts[keep]
        return ids[:k].tolist(), counts[:k].tolist()

    def info(self) -> dict[str, Any]:
        """What ``/readyz`` reports: version, sizes, the backend serving and its beam width."""
        return {
            "model_version": self.meta.version,
            "num_items": len(self.backend.retriever) if self.editable else self.backend.num_items,
            "num_users": len(self.backend.users),
            "index": self.backend.name,
            "beam": self.backend.beam,
        }
