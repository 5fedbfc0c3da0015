"""The MFLI index: posting lists from (facet, code path) to items, beam-searched with no ANN.

Each facet f has a residual codebook ``[L, K, D_f]`` (trained with the item embeddings, see
``training.models.rq``) and every item indexed in that facet has a code path ``(c0, .., c_{L-1})``.
A path is stored as one int64 key ``c0 K^{L-1} + c1 K^{L-2} + ... + c_{L-1}``, so all paths under
a prefix at depth d form one contiguous key range: gathering "the items under this node" is two
``searchsorted`` calls on the sorted keys, at any depth.

Lookup (:meth:`MFLIIndex.search`), per facet: score the K level-0 codewords against the user's
facet vector, keep the best ``beam`` non-empty prefixes, extend each by the K codewords of the next level
(a prefix's score is the sum of its codewords' scores: dot products are additive), keep the best
``beam`` again, down to ``depth`` levels; gather the items under the kept prefixes. The union
over facets is scored exactly with the full embedding (the sum of the facet scores) and the
top-k returned. ``stats`` counts (user, item) and (user, code node) scores.

Lookup cost is memory access and op dispatch, not arithmetic (a beam of 64 scores a few hundred
items), so the hot path avoids both: prefix spaces up to ``DENSE_PREFIXES`` keys get dense
tables (an additive 0 / -inf occupancy table per level and CSR offsets into the sorted postings)
instead of binary searches, row gathers use ``index_select`` (:func:`take`), and on CPU each
user (one user is the serving case) runs the same steps through compiled kernels
(:mod:`training.index.mfli_lookup`, via :meth:`MFLIIndex._search_one`), which pay no per-op
dispatch at all. ``make bench-synth1m`` times both paths.

Real-time updates without a rebuild: items live in append-only rows (grown by doubling); a
facet's postings are a sorted part plus a small unsorted tail that new and re-coded items are
appended to; removal clears a row's ``alive`` flag and re-coding changes the row's current key,
so stale entries are skipped at lookup. :meth:`MFLIIndex.compact` folds the tail in and drops
stale entries (it runs by itself when the tail grows past ``max(4096, 5%)`` of the postings).

Notation: B users, F facets, D = sum of facet dims (the model's concatenated embedding), R item
rows, L levels, K codes, b beam width, k results.

On disk (``index/mfli/`` of a run folder): ``items.parquet`` (``item_id`` int64 and, per facet,
``<facet>_embedding`` list<float32> and ``<facet>_codes`` list<int16>, null where the item is
not indexed in that facet), ``codebooks.pt`` (``{facet: [L, K, D_f]}``) and ``index.json``.

Example::

    index = MFLIIndex({"engagement": cb_e, "semantic": cb_s}, beam=16, depth=2)
    index.add_items(ids, {"engagement": emb_e, "semantic": emb_s})
    index.add_items(torch.tensor([99]), {"semantic": cold_emb})   # cold item: one facet
    result = index.search(user_emb, k=10, exclude=[seen])         # user_emb [B, D_e + D_s]
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.index import mfli_lookup
from training.index.mfli_beam import beam_search, nodes_per_user, take
from training.index.mfli_postings import DENSE_PREFIXES, NumpyViews, Postings
from training.models.rq import greedy_encode, path_keys  # path_keys: also imported from here by callers
from training.retrieval.exclude import excluded_positions
from training.retrieval.protocol import PAD_ITEM_ID, SearchResult, check_search_args

_NO_IDS = np.empty(0, dtype=np.int64)


@dataclass
class FacetSpec:
    """One facet: its name, its codebooks ``[L, K, D_f]`` and its columns in the embedding."""

    name: str
    codebooks: torch.Tensor
    start: int

    @property
    def dim(self) -> int:
        return self.codebooks.shape[2]

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def codes(self) -> int:
        return self.codebooks.shape[1]


class MFLIIndex:
    """Posting lists per (facet, code path) with beam-search lookup (the retriever protocol).

    Args:
        codebooks: facet name → ``[L, K, D_f]``, in the order the facets' columns appear in
            the model's concatenated embedding (user and item alike).
        beam: prefixes kept per level per facet (b).
        depth: levels descended before gathering items (1..L); fewer levels gather more
            items per prefix.
    """

    def __init__(self, codebooks: dict[str, torch.Tensor], beam: int = 16, depth: int | None = None) -> None:
        self.facets: list[FacetSpec] = []
        start = 0
        for name, cb in codebooks.items():
            self.facets.append(FacetSpec(name, cb.detach().to(torch.float32).contiguous(), start))
            start += cb.shape[2]
        self.dim = start
        self.beam = beam
        self.depth = depth
        # False sends every lookup through the batched torch path (the benchmark's baseline for
        # the per-user compiled path; results are the same)
        self.compiled_lookup = True
        self._rows = 0
        self._ids = torch.empty(0, dtype=torch.int64)  # [R cap] row → item id
        self._emb = torch.empty(0, self.dim)  # [R cap, D]; zeros in a facet the row lacks
        self._codes = {f.name: torch.empty(0, f.levels, dtype=torch.int16) for f in self.facets}
        self._key = {f.name: torch.empty(0, dtype=torch.int64) for f in self.facets}  # -1: absent
        self._postings = {f.name: Postings() for f in self.facets}
        self._row_of: dict[int, int] = {}
        self._id_lookup: tuple[torch.Tensor, torch.Tensor] | None = None  # (sorted ids, rows)
        self._scratch = threading.local()  # per-thread [R] mark array of the compiled path's dedup
        self._np = NumpyViews()  # numpy views of the tensors above, for the one-user path
        # facet -> the non-empty prefixes per length 1..L, each a 0 / -inf table [K^(d-1), K]
        # while K^d <= DENSE_PREFIXES, else sorted keys (beam_search's ``occupied``) (built lazily; an add merges its prefixes in, a
        # removal leaves them until the next compaction, so a listed prefix may be empty but a
        # non-empty one is always listed)
        self._occupied: dict[str, list[torch.Tensor] | None] = {f.name: None for f in self.facets}
        self._dense_occupied: dict[str, torch.Tensor] = {}  # facet -> the buffer behind its dense tables
        # facet -> whether postings may hold entries whose row moved or died since the last
        # compaction; while False a lookup skips the per-entry currency check
        self._stale = {f.name: False for f in self.facets}

    def __getstate__(self) -> dict:
        """Pickling (e.g. into a Ray actor) drops the thread-local scratch; it is rebuilt."""
        state = dict(self.__dict__)
        state["_scratch"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _scratch=threading.local())

    # ------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._row_of

    def facet(self, name: str) -> FacetSpec:
        return next(f for f in self.facets if f.name == name)

    def encode(self, name: str, emb: torch.Tensor) -> torch.Tensor:
        """Greedy residual code paths ``[N, L]`` of facet vectors ``[N, D_f]`` (``rq.greedy_encode``)."""
        return greedy_encode(emb.to(torch.float32), self.facet(name).codebooks)[0]

    def codes_of(self, name: str, item_ids: torch.Tensor) -> torch.Tensor:
        """Stored code paths ``[N, L]`` of items (-1 rows for items absent from the facet)."""
        rows = torch.tensor([self._row_of[int(i)] for i in item_ids.tolist()], dtype=torch.int64)
        codes = self._codes[name][rows].to(torch.int64)
        codes[self._key[name][rows] < 0] = -1
        return codes

    def facet_vectors(self, name: str, item_ids: torch.Tensor) -> torch.Tensor:
        """Stored facet vectors ``[N, D_f]`` of items (zeros where absent from the facet)."""
        f = self.facet(name)
        rows = torch.tensor([self._row_of[int(i)] for i in item_ids.tolist()], dtype=torch.int64)
        return self._emb[rows, f.start : f.start + f.dim].clone()

    def occupancy(self, name: str) -> torch.Tensor:
        """Live items per code per level of one facet: ``[L, K]``."""
        f = self.facet(name)
        live = self._key[name][: self._rows] >= 0
        codes = self._codes[name][: self._rows][live].to(torch.int64)
        return torch.stack([torch.bincount(codes[:, l], minlength=f.codes) for l in range(f.levels)])

    # ------------------------------------------------------------ updates
    def add_items(
        self,
        item_ids: torch.Tensor,
        embeddings: dict[str, torch.Tensor],
        codes: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Index new items (or replace existing ones) in the facets given.

        Args:
            item_ids: ``[N]`` int64 raw ids.
            embeddings: facet → ``[N, D_f]``; a facet left out leaves the items out of its
                posting lists and scores them 0 there (a cold item has only content facets).
            codes: facet → ``[N, L]`` precomputed paths (loading); default: encode.
        """
        item_ids = item_ids.to(torch.int64).reshape(-1)
        unknown = set(embeddings) - {f.name for f in self.facets}
        if unknown:
            raise ValueError(f"unknown facets {sorted(unknown)}")
        known = [i for i in item_ids.tolist() if i in self._row_of]
        if known:
            self.remove_items(torch.tensor(known))
        n = item_ids.numel()
        rows = torch.arange(self._rows, self._rows + n)
        self._grow(self._rows + n)
        self._ids[rows] = item_ids
        self._emb[rows] = 0.0
        for f in self.facets:
            self._key[f.name][rows] = -1
            if f.name not in embeddings:
                continue
            emb = embeddings[f.name].to(torch.float32)
            self._emb[rows, f.start : f.start + f.dim] = emb
            path = codes[f.name] if codes is not None and f.name in codes else self.encode(f.name, emb)
            self._set_path(f, rows, path)
        self._rows += n
        self._row_of.update(zip(item_ids.tolist(), rows.tolist()))
        self._id_lookup = None
        self._maybe_compact()

    def remove_items(self, item_ids: torch.Tensor) -> int:
        """Drop items from every facet; unknown ids are ignored. Returns how many were removed."""
        rows = [self._row_of.pop(int(i)) for i in item_ids.reshape(-1).tolist() if int(i) in self._row_of]
        self._id_lookup = None
        if rows:
            r = torch.tensor(rows, dtype=torch.int64)
            for f in self.facets:
                self._key[f.name][r] = -1
                self._stale[f.name] = True
        return len(rows)

    def reassign(self, item_ids: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> int:
        """Update items' facet vectors and re-code them where the path drifted.

        Returns the number of (item, facet) entries whose code path changed (each moves to
        its new posting list at once; the old entry is skipped from then on).
        """
        rows = torch.tensor([self._row_of[int(i)] for i in item_ids.reshape(-1).tolist()], dtype=torch.int64)
        moved = 0
        for f in self.facets:
            if f.name not in embeddings:
                continue
            emb = embeddings[f.name].to(torch.float32)
            self._emb[rows, f.start : f.start + f.dim] = emb
            path = self.encode(f.name, emb)
            changed = path_keys(path, f.codes) != self._key[f.name][rows]
            moved += int(changed.sum())
            if bool(changed.any()):
                self._set_path(f, rows[changed], path[changed])
                self._stale[f.name] = True
        self._maybe_compact()
        return moved

    def compact(self) -> None:
        """Fold every facet's tail into its sorted postings and drop stale entries."""
        for f in self.facets:
            self._compact_facet(f)

    def _compact_facet(self, f: FacetSpec) -> None:
        self._postings[f.name].compact(self._key[f.name])
        self._occupied[f.name] = None  # exact again: prefixes emptied by removals drop out
        self._stale[f.name] = False

    def _set_path(self, f: FacetSpec, rows: torch.Tensor, path: torch.Tensor) -> None:
        keys = path_keys(path, f.codes)
        self._codes[f.name][rows] = path.to(torch.int16)
        self._key[f.name][rows] = keys
        self._postings[f.name].append(keys, rows)
        occupied = self._occupied[f.name]
        if occupied is None:
            return
        for d, occ in enumerate(occupied, start=1):
            prefixes = keys // f.codes ** (f.levels - d)
            if occ.is_floating_point():
                occ.view(-1)[prefixes] = 0.0
            else:
                occupied[d - 1] = torch.unique(torch.cat([occ, prefixes]))

    def _occupancy(self, name: str) -> list[torch.Tensor]:
        """Non-empty prefixes per length 1..L as :func:`beam_search` takes them (cached).

        The dense tables are views into one buffer (:meth:`_dense_occupancy`), laid end to end
        as the compiled lookup reads them; updates write through the views.
        """
        if self._occupied[name] is None:
            f = self.facet(name)
            keys = self._key[name][: self._rows]
            keys = keys[keys >= 0]
            dense = [d for d in range(1, f.levels + 1) if f.codes**d <= DENSE_PREFIXES]
            flat = torch.full((sum(f.codes**d for d in dense),), float("-inf"))
            levels, start = [], 0
            for d in range(1, f.levels + 1):
                prefixes = torch.unique(keys // f.codes ** (f.levels - d))
                if d in dense:
                    table = flat[start : start + f.codes**d]
                    table[prefixes] = 0.0
                    levels.append(table.view(f.codes ** (d - 1), f.codes))
                    start += f.codes**d
                else:
                    levels.append(prefixes)
            self._occupied[name] = levels
            self._dense_occupied[name] = flat
        return self._occupied[name]

    def _dense_occupancy(self, name: str) -> torch.Tensor:
        """The dense 0 / -inf tables of prefix lengths 1, 2, .. laid end to end ``[K + K^2 + ..]``."""
        self._occupancy(name)
        return self._dense_occupied[name]

    def occupied_prefixes(self, name: str) -> list[torch.Tensor]:
        """Sorted keys of the prefixes of each length 1..L that hold an item in facet ``name``."""
        return [(occ.view(-1) == 0).nonzero().flatten() if occ.is_floating_point() else occ for occ in self._occupancy(name)]

    def _maybe_compact(self) -> None:
        for f in self.facets:
            p = self._postings[f.name]
            if p.tail_keys.numel() > max(4096, len(p) // 20):
                self._compact_facet(f)

    def _grow(self, rows: int) -> None:
        """Capacity for ``rows`` rows, doubling so that appends are amortised O(1)."""
        cap = self._ids.numel()
        if rows <= cap:
            return
        new = max(rows, 2 * cap, 1024)

        def grown(t: torch.Tensor, fill: float) -> torch.Tensor:
            out = torch.full((new, *t.shape[1:]), fill, dtype=t.dtype)
            out[:cap] = t
            return out

        self._ids = grown(self._ids, PAD_ITEM_ID)
        self._emb = grown(self._emb, 0.0)
        for f in self.facets:
            self._codes[f.name] = grown(self._codes[f.name], 0)
            self._key[f.name] = grown(self._key[f.name], -1)

    # ------------------------------------------------------------ lookup
    def search(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        """Top-k items by beam search over each facet's codes, then exact scoring.

        Args:
            user_emb: ``[B, D]`` the model's concatenated facet vectors.
        See ``training.retrieval.protocol`` for the contract.
        """
        batch = check_search_args(user_emb, k, exclude, self.dim)
        user_emb = user_emb.to(torch.float32)
        if self.compiled_lookup and user_emb.device.type == "cpu" and self._dense(self.facets):
            users = np.ascontiguousarray(user_emb.detach().numpy())  # kernels are compiled for C order
            found = [self._search_one(users[i], k, exclude[i] if exclude is not None else None) for i in range(batch)]
            if batch == 1:
                return found[0]
            return SearchResult(
                torch.cat([r.item_ids for r in found]),
                torch.cat([r.scores for r in found]),
                {key: sum(r.stats[key] for r in found) for key in ("items_scored", "nodes_scored")},
            )
        pair_user, pair_row, nodes = [], [], 0
        for f in self.facets:
            depth = min(self.depth or f.levels, f.levels)
            occupied = self._occupancy(f.name)[:depth]
            prefix, n = beam_search(user_emb[:, f.start : f.start + f.dim], f.codebooks, self.beam, depth, occupied)
            nodes += n
            span = f.codes ** (f.levels - depth)  # keys under one prefix
            flat = prefix.flatten()  # [B * b]
            query, rows = self._postings[f.name].gather_prefixes(flat, span, f.codes**depth)
            user = query // prefix.shape[1]
            if self._stale[f.name]:
                # an entry is current only if its row is alive and its key still falls under
                # this prefix (removed and re-coded rows leave entries behind until compaction)
                key = take(self._key[f.name], rows)
                valid = (key >= 0) & (key // span == flat[query])
                user, rows = user[valid], rows[valid]
            pair_user.append(user)
            pair_row.append(rows)
        users = torch.cat(pair_user)
        rows = torch.cat(pair_row)
        # one candidate per (user, row) across facets; sorted by user, then row
        width = max(self._rows, 1)
        pair = torch.unique(users * width + rows)
        items_scored = int(pair.numel())
        users, rows = pair // width, pair % width
        # candidates as a padded [B, C] grid, scored with one batched matrix-vector product
        counts = torch.bincount(users, minlength=batch)  # [B]
        cols = max(int(counts.max()) if counts.numel() else 0, 1)
        col = torch.arange(users.numel()) - (torch.cumsum(counts, 0) - counts)[users]
        grid_rows = torch.zeros(batch, cols, dtype=torch.int64)  # [B, C]
        grid_rows[users, col] = rows
        real = torch.zeros(batch, cols, dtype=torch.bool)
        real[users, col] = True
        if exclude is not None:
            real[users, col] = ~self._excluded(pair, exclude)
        scores = torch.bmm(take(self._emb, grid_rows), user_emb.unsqueeze(2)).squeeze(2)  # [B, C, D] @ [B, D, 1]
        scores = scores.masked_fill(~real, float("-inf"))
        top, picked = torch.topk(scores, min(k, cols), dim=1)  # [B, k']
        return self._result(take(self._ids, grid_rows.gather(1, picked)), top, k, items_scored, nodes)

    def _dense(self, facets: list[FacetSpec]) -> bool:
        """Whether every facet's searched prefix spaces use dense tables (the compiled path's need)."""
        return all(f.codes ** min(self.depth or f.levels, f.levels) <= DENSE_PREFIXES for f in facets)

    def _search_one(self, user: np.ndarray, k: int, exclude: torch.Tensor | None) -> SearchResult:
        """:meth:`search` for one user ``[D]`` through the compiled kernels of
        :mod:`training.index.mfli_lookup` (batches loop over their users).

        Same steps and results as the batched torch path (``tests/training/test_mfli_index.py``
        checks they agree). Why a second implementation: a one-user lookup is ~100 small-array
        ops, and on a 2-core VM each torch op costs 4-10 us of dispatch, so the torch path spent
        most of a lookup dispatching; and its batched form pads every user's candidates to the
        longest list and gathers one ``[B, C, D]`` block, hundreds of MB at batch 256 and beam
        256 on 1M items. ``make bench-synth1m`` reports both paths.
        """
        mark, stamp = self._stamp()
        found, nodes = [], 0
        for f in self.facets:
            depth = min(self.depth or f.levels, f.levels)
            occupancy = self._np(f"occ:{f.name}", self._dense_occupancy(f.name))
            codebooks = self._np(f"codebooks:{f.name}", f.codebooks)
            prefix = mfli_lookup.beam_prefixes(user[f.start : f.start + f.dim], codebooks, occupancy, self.beam, depth)
            nodes += nodes_per_user(f.codes, self.beam, depth)
            span = f.codes ** (f.levels - depth)
            found.append(
                mfli_lookup.gather_rows(
                    prefix,
                    *self._postings[f.name].csr_views(span, f.codes**depth),
                    self._np(f"key:{f.name}", self._key[f.name]),
                    self._stale[f.name],
                    span,
                    mark,
                    stamp,
                )
            )
        rows = found[0] if len(found) == 1 else np.concatenate(found)  # [C], one per item
        seen = _NO_IDS if exclude is None else np.ascontiguousarray(exclude.numpy().reshape(-1), dtype=np.int64)
        emb, ids = self._np("emb", self._emb), self._np("ids", self._ids)
        top_ids, top_scores = mfli_lookup.top_k(emb, user, rows, ids, seen, k, PAD_ITEM_ID)
        return SearchResult(
            torch.from_numpy(top_ids).unsqueeze(0),
            torch.from_numpy(top_scores).unsqueeze(0),
            {"items_scored": len(rows), "nodes_scored": nodes},
        )

    def _stamp(self) -> tuple[np.ndarray, int]:
        """This thread's ``[R]`` mark array and a stamp no row of it holds yet (the compiled
        gather's dedup across facets: a row is taken once per stamp, so the array is never
        cleared)."""
        scratch = self._scratch
        mark = getattr(scratch, "mark", None)
        if mark is None or len(mark) < self._rows:
            mark = scratch.mark = np.zeros(max(2 * self._rows, 1024), dtype=np.int64)
            scratch.stamp = 0
        scratch.stamp += 1
        return mark, scratch.stamp

    @staticmethod
    def _result(ids: torch.Tensor, top: torch.Tensor, k: int, items_scored: int, nodes: int) -> SearchResult:
        """Pad ``[B, k']`` ids and scores to ``k`` columns (PAD_ITEM_ID / -inf) and wrap them."""
        ids[torch.isneginf(top)] = PAD_ITEM_ID
        if top.shape[1] < k:
            pad = k - top.shape[1]
            ids = torch.cat([ids, torch.full((ids.shape[0], pad), PAD_ITEM_ID)], dim=1)
            top = torch.cat([top, torch.full((top.shape[0], pad), float("-inf"))], dim=1)
        return SearchResult(ids, top, {"items_scored": items_scored, "nodes_scored": nodes})

    def _excluded(self, pair: torch.Tensor, exclude: list[torch.Tensor]) -> torch.Tensor:
        """Mask ``[M]`` of candidate pairs (``user * rows + row``) whose item a user excluded.

        A binary search of each candidate in the sorted excluded keys: ``torch.isin`` took
        ~0.25 ms for a thousand candidates against forty seen items, a third of a lookup.
        """
        width = max(self._rows, 1)
        ids_sorted, rows_sorted = self._sorted_ids()
        users, pos = excluded_positions(exclude, ids_sorted)
        keys = torch.sort(users * width + rows_sorted[pos]).values
        if keys.numel() == 0:
            return torch.zeros_like(pair, dtype=torch.bool)
        pos = torch.searchsorted(keys, pair).clamp(max=keys.numel() - 1)
        return take(keys, pos) == pair

    def _sorted_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Live ids ascending and their rows, rebuilt lazily after updates (O(R log R) once)."""
        if self._id_lookup is None:
            rows = torch.tensor(list(self._row_of.values()), dtype=torch.int64)
            ids_sorted, order = torch.sort(self._ids[rows])
            self._id_lookup = (ids_sorted, rows[order])
        return self._id_lookup

    def _rows_of_np(self, ids: np.ndarray) -> np.ndarray:
        """Rows of raw ids ``[E]`` (-1 where unknown), by binary search over the sorted ids
        (O(E log R) per search), so masking seen items needs no Python loop over ids."""
        ids_sorted, rows_sorted = self._sorted_ids()
        ids_sorted, rows_sorted = self._np("ids_sorted", ids_sorted), self._np("rows_sorted", rows_sorted)
        if len(ids_sorted) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.searchsorted(ids_sorted, ids).clip(max=len(ids_sorted) - 1)
        return np.where(ids_sorted[pos] == ids, rows_sorted[pos], -1)

    def item_ids(self) -> torch.Tensor:
        """Live items' raw ids ``[N]`` (no order promised)."""
        return torch.tensor(list(self._row_of), dtype=torch.int64)

    def item_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Live items' raw ids ``[N]`` and the full vectors ``[N, D]`` the lookup scores them with.

        Why: a baseline index (FAISS) judged against this one has to hold the same vectors,
        queried with the same ``[B, D]`` user vector (zeros in a facet an item lacks, as here).
        """
        rows = torch.tensor(sorted(self._row_of.values()), dtype=torch.int64)
        return self._ids[rows].clone(), self._emb[rows].clone()

    # ------------------------------------------------------------ on disk
    def save(self, directory: str | Path, meta: dict | None = None) -> None:
        """Write ``items.parquet``, ``codebooks.pt`` and ``index.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows = torch.tensor(sorted(self._row_of.values()), dtype=torch.int64)
        columns: dict[str, pa.Array] = {"item_id": pa.array(self._ids[rows].numpy())}
        for f in self.facets:
            present = (self._key[f.name][rows] >= 0).numpy()
            emb = self._emb[rows, f.start : f.start + f.dim].numpy().reshape(-1)
            codes = self._codes[f.name][rows].numpy().reshape(-1)
            mask = pa.array(~present)
            columns[f"{f.name}_embedding"] = _fixed_lists(emb.astype(np.float32), f.dim, mask, pa.float32())
            columns[f"{f.name}_codes"] = _fixed_lists(codes.astype(np.int16), f.levels, mask, pa.int16())
        pq.write_table(pa.table(columns), directory / "items.parquet")
        torch.save({f.name: f.codebooks for f in self.facets}, directory / "codebooks.pt")
        info = {
            "model": "mfli",
            "facets": [{"name": f.name, "dim": f.dim, "levels": f.levels, "codes": f.codes} for f in self.facets],
            "dim": self.dim,
            "num_items": len(self),
            "beam": self.beam,
            "depth": self.depth,
            **(meta or {}),
        }
        (directory / "index.json").write_text(json.dumps(info, indent=2))

    @classmethod
    def load(cls, directory: str | Path, beam: int | None = None, depth: int | None = None) -> MFLIIndex:
        """Read an index written by :meth:`save` (stored codes are used, not re-encoded)."""
        directory = Path(directory)
        info = json.loads((directory / "index.json").read_text())
        codebooks = torch.load(directory / "codebooks.pt")
        ordered = {f["name"]: codebooks[f["name"]] for f in info["facets"]}
        index = cls(ordered, beam=beam or info["beam"], depth=depth if depth is not None else info["depth"])
        table = pq.read_table(directory / "items.parquet")
        ids = torch.from_numpy(table.column("item_id").to_numpy().astype(np.int64))
        for f in index.facets:
            emb_col = table.column(f"{f.name}_embedding").combine_chunks()
            present = np.asarray(emb_col.is_valid())
            if not present.any():
                continue
            emb = np.asarray(emb_col.filter(pa.array(present)).flatten(), dtype=np.float32).reshape(-1, f.dim)
            code_col = table.column(f"{f.name}_codes").combine_chunks().filter(pa.array(present))
            codes = np.asarray(code_col.flatten(), dtype=np.int64).reshape(-1, f.levels)
            sel = torch.from_numpy(np.flatnonzero(present))
            index._add_facet_rows(ids, sel, f, torch.from_numpy(emb.copy()), torch.from_numpy(codes.copy()))
        index.compact()
        index.warm_up()
        return index

    def warm_up(self) -> None:
        """Run one lookup so that the compiled kernels are loaded (or, on a cold cache, compiled:
        ~10 s) now rather than on a caller's first request; :meth:`load` does this."""
        self.search(torch.zeros(1, self.dim), 1, exclude=[torch.empty(0, dtype=torch.int64)])

    def _add_facet_rows(self, ids: torch.Tensor, sel: torch.Tensor, f: FacetSpec, emb: torch.Tensor, codes: torch.Tensor) -> None:
        """Loading: rows for ``ids`` (created on first sight) get facet ``f`` at ``sel``."""
        new = [i for i in ids.tolist() if i not in self._row_of]
        if new:
            n = len(new)
            rows = torch.arange(self._rows, self._rows + n)
            self._grow(self._rows + n)
            self._ids[rows] = torch.tensor(new, dtype=torch.int64)
            self._rows += n
            self._row_of.update(zip(new, rows.tolist()))
            self._id_lookup = None
        rows = torch.tensor([self._row_of[i] for i in ids[sel].tolist()], dtype=torch.int64)
        self._emb[rows, f.start : f.start + f.dim] = emb
        self._set_path(f, rows, codes)


def _fixed_lists(flat: np.ndarray, width: int, mask: pa.Array, value_type: pa.DataType) -> pa.Array:
    """Flat values → ``list<value_type>`` of ``width`` per row, null where ``mask``."""
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), width, mask=mask)
    return fixed.cast(pa.list_(value_type))
