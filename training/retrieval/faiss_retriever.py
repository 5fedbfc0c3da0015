"""FAISS baselines behind the retriever protocol: IVF-Flat, IVF over a residual coarse quantizer, HNSW.

Every FAISS index the benchmarks compare against is built here, over whatever item vectors the
caller passes. Why one place: a learned index (MFLI, HSNN) is only judged fairly against FAISS
built over **the same item vectors it scores** and queried with the same user vector, so the
benchmarks build FAISS over each model's own vectors (``vectors``: ``mfli``, ``hsnn``,
``two_tower``) and compare each system with its own exact top-k. Keeping the construction,
the search knobs and the seen-item masking in one class makes those rows comparable.

Kinds (all inner product, the score every model here ranks by):

* ``ivf``: ``IndexIVFFlat`` over a flat k-means quantizer of ``nlist`` lists; knob ``nprobe``.
* ``ivf_rq``: ``IndexIVFFlat`` whose coarse quantizer is a ``ResidualCoarseQuantizer`` of
  ``rq_levels`` levels x ``2^rq_bits`` codes (``index_factory("IVF<n>(RCQ<L>x<b>),Flat")``,
  FAISS >= 1.7.2), so ``nlist = 2^(L b)`` and a list is a residual code path, as an MFLI posting
  list is. Knob ``nprobe``; the quantizer scores every code path (``beam_factor`` -1).
* ``hnsw``: ``IndexHNSWFlat`` with ``m`` links per node (``efConstruction`` 40); knob ``ef_search``.

Seen items are masked *inside* the search with an ``IDSelectorBitmap`` (FAISS >= 1.7.3), as
the learned indexes mask while they score: an excluded item never takes a result slot, and the
search returns k unseen items without over-fetching ``k + len(seen)`` (which, for a user who has
seen half a small catalogue, turns a top-100 search into a top-900 one and charges FAISS for it).

``stats``: ``items_scored`` is FAISS's own count of distances computed (``indexIVF_stats.ndis``
or ``hnsw_stats.ndis``), ``nodes_scored`` the coarse centroids scored (``nlist`` per query for
``ivf``; 0 where FAISS does not count them). The counters are process-global, so the counts are
right only when one search runs at a time (the benchmarks' single-thread case).

Notation: B users, D dim, N items, k results.

Example::

    ivf = FaissRetriever(item_ids, item_emb, FaissConfig("ivf", nlist=64, nprobe=8))
    result = ivf.search(user_emb, k=100, exclude=seen)     # [B, 100] ids, seen items never returned
    ivf.set_knob(64)                                        # nprobe = nlist: exact
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from training.retrieval.exclude import excluded_positions
from training.retrieval.protocol import PAD_ITEM_ID, SearchResult, check_search_args

FaissKind = Literal["ivf", "ivf_rq", "hnsw"]
KINDS: tuple[str, ...] = ("ivf", "ivf_rq", "hnsw")


@dataclass(frozen=True)
class FaissConfig:
    """Which FAISS index to build and how to search it.

    Args:
        kind: ``ivf``, ``ivf_rq`` or ``hnsw`` (module docstring).
        nlist: inverted lists of ``ivf`` (capped at the item count); ``ivf_rq`` derives its own.
        nprobe: lists scanned per query (``ivf``, ``ivf_rq``).
        m: HNSW links per node.
        ef_search: HNSW candidate queue length per query.
        rq_levels: residual levels of the ``ivf_rq`` coarse quantizer.
        rq_bits: bits per level of the ``ivf_rq`` coarse quantizer (``2^bits`` codes per level).
    """

    kind: FaissKind
    nlist: int = 64
    nprobe: int = 8
    m: int = 32
    ef_search: int = 128
    rq_levels: int = 2
    rq_bits: int = 3

    @property
    def knob(self) -> str:
        """The search-time knob of this kind, by its FAISS name (``nprobe`` or ``efSearch``)."""
        return "efSearch" if self.kind == "hnsw" else "nprobe"

    def build_params(self) -> dict[str, int | str]:
        """The build-time parameters, named as the benchmark rows name them."""
        if self.kind == "ivf":
            return {"nlist": self.nlist}
        if self.kind == "ivf_rq":
            return {"nlist": 2 ** (self.rq_levels * self.rq_bits), "rcq": f"{self.rq_levels}x{self.rq_bits}"}
        return {"M": self.m}


class FaissRetriever:
    """A FAISS inner-product index over given item vectors (retriever protocol).

    Args:
        item_ids: ``[N]`` int64 raw item ids, row i for ``item_emb[i]``.
        item_emb: ``[N, D]`` the vectors the index holds; queries are ``[B, D]`` in the same space.
        config: :class:`FaissConfig`.
    """

    def __init__(self, item_ids: torch.Tensor, item_emb: torch.Tensor, config: FaissConfig) -> None:
        import faiss

        if config.kind not in KINDS:
            raise ValueError(f"unknown faiss index kind {config.kind!r} (one of {KINDS})")
        x = np.ascontiguousarray(item_emb.detach().to(torch.float32).numpy())
        n, d = x.shape
        if config.kind == "ivf":
            config = replace(config, nlist=min(config.nlist, n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, config.nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = 1234  # FAISS's default, pinned: the same lists every build
        elif config.kind == "ivf_rq":
            nlist = 2 ** (config.rq_levels * config.rq_bits)
            spec = f"IVF{nlist}(RCQ{config.rq_levels}x{config.rq_bits}),Flat"
            index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)  # an IndexIVFFlat, owning its RCQ
            # score every centroid through the codebooks (exact assignment); at nlist up to a few
            # thousand that is also faster than the quantizer's beam (measured 0.07 vs 0.13 ms at 64)
            faiss.downcast_index(index.quantizer).set_beam_factor(-1.0)
            config = replace(config, nlist=nlist)
        else:
            index = faiss.IndexHNSWFlat(d, config.m, faiss.METRIC_INNER_PRODUCT)
        if config.kind != "hnsw":
            index.train(x)
        index.add(x)
        self.index = index
        self.config = config
        self.item_ids = item_ids.to(torch.int64)
        self._ids_np = self.item_ids.numpy()
        self._row_table = _row_table(self._ids_np)
        # seen-item masking (module docstring): one "allowed" bitmap over the rows, all ones between
        # searches; a search clears its user's rows, searches, and sets them back, so masking costs
        # O(seen items) per query (a fresh IDSelectorBatch measured ~20 us, a fresh bitmap ~18 us,
        # the search itself ~20 us at batch 1 on ml-100k)
        self._allowed = np.full((n + 7) // 8, 0xFF, dtype=np.uint8)
        self._selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(self._allowed))
        self._params = faiss.SearchParametersHNSW() if config.kind == "hnsw" else faiss.SearchParametersIVF()
        self._params.sel = self._selector
        self._lock = threading.Lock()  # the bitmap is shared: one masked search at a time
        self.set_knob(config.ef_search if config.kind == "hnsw" else config.nprobe)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def num_items(self) -> int:
        return int(self.item_ids.numel())

    def set_knob(self, value: int) -> FaissRetriever:
        """Set the search knob (``nprobe`` or ``efSearch``) in place; returns self (for sweeps)."""
        if self.kind == "hnsw":
            self.config = replace(self.config, ef_search=int(value))
            self.index.hnsw.efSearch = self._params.efSearch = int(value)
        else:
            self.config = replace(self.config, nprobe=min(int(value), self.config.nlist))
            self.index.nprobe = self._params.nprobe = self.config.nprobe
        return self

    def search(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        """Top-k items by inner product; ``exclude[b]`` (raw ids) masked inside the search."""
        import faiss

        batch = check_search_args(user_emb, k, exclude)
        queries = user_emb.detach().to(torch.float32).contiguous().numpy()
        fetch = min(k, self.num_items)
        stats = faiss.cvar.hnsw_stats if self.kind == "hnsw" else faiss.cvar.indexIVF_stats
        stats.reset()
        if not exclude or all(e.numel() == 0 for e in exclude):
            scores, rows = self.index.search(queries, fetch)
        else:
            scores = np.empty((batch, fetch), dtype=np.float32)
            rows = np.empty((batch, fetch), dtype=np.int64)
            with self._lock:
                for b in range(batch):
                    self._search_masked(queries[b : b + 1], fetch, exclude[b], scores[b : b + 1], rows[b : b + 1])
        ids = np.where(rows >= 0, self._ids_np[rows], PAD_ITEM_ID)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32, copy=False)
        if fetch < k:
            ids = np.pad(ids, ((0, 0), (0, k - fetch)), constant_values=PAD_ITEM_ID)
            scores = np.pad(scores, ((0, 0), (0, k - fetch)), constant_values=-np.inf)
        counts = {"items_scored": int(stats.ndis), "nodes_scored": batch * self.config.nlist if self.kind == "ivf" else 0}
        return SearchResult(torch.from_numpy(ids), torch.from_numpy(scores), counts)

    def _search_masked(self, query: np.ndarray, fetch: int, seen: torch.Tensor, scores: np.ndarray, rows: np.ndarray) -> None:
        """One query with its ``seen`` raw ids cleared from the allowed bitmap (restored after)."""
        hidden = self._rows_of(seen)
        byte, bit = hidden >> 3, (1 << (hidden & 7)).astype(np.uint8)
        np.bitwise_and.at(self._allowed, byte, ~bit)
        try:
            self.index.search(query, fetch, params=self._params, D=scores, I=rows)
        finally:
            np.bitwise_or.at(self._allowed, byte, bit)

    def _rows_of(self, raw_ids: torch.Tensor) -> np.ndarray:
        """Index rows of the raw ids that are in the index (others dropped)."""
        wanted = raw_ids.reshape(-1).to(torch.int64).numpy()
        table = self._row_table
        if isinstance(table, np.ndarray):
            wanted = wanted[(wanted >= 0) & (wanted < len(table))]
            found = table[wanted]
            return found[found >= 0]
        sorted_ids, order = table
        _, pos = excluded_positions([torch.from_numpy(wanted)], torch.from_numpy(sorted_ids))  # the one seen-item lookup
        return order[pos.numpy()]


def _row_table(ids: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Raw id -> row: a dense array (-1: absent) while the ids are small next to their count,
    else the sorted ids and their rows (binary search)."""
    if len(ids) and ids.min() >= 0 and ids.max() < 8 * len(ids) + 1024:
        table = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        table[ids] = np.arange(len(ids))
        return table
    order = np.argsort(ids, kind="stable")
    return ids[order], order
