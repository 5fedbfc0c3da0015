"""One MFLI facet's posting lists (code-path key → item rows), appendable without a rebuild.

Keys are sorted with their rows, plus an unsorted tail that new and re-coded items are appended
to until :meth:`Postings.compact` folds it in; prefix spaces small enough get dense CSR
offsets instead of binary searches. :class:`NumpyViews` memoises the numpy views the compiled
one-user lookup reads.
"""

from __future__ import annotations

import numpy as np
import torch

from training.index.mfli_beam import take

# Prefix spaces up to this many keys get dense tables (an occupancy table and CSR offsets into
# the sorted postings: 12 bytes per key); larger ones (e.g. depth 3 at K=256: 16.7M) fall back to
# binary search over sorted keys.
DENSE_PREFIXES = 1 << 20


class NumpyViews:
    """``tensor.numpy()`` memoised by name while the tensor stays the same object.

    Why: ``Tensor.numpy()`` costs ~2.5 us here and a one-user lookup needs a dozen views, a tenth
    of the cheapest lookup. The index replaces its tensors on update (it never resizes them in
    place), so an identity check tells when a view is stale, and keying by name drops a
    replaced tensor's view at once. Pickling drops the views (they are rebuilt on first use).
    """

    def __init__(self) -> None:
        self._views: dict[str, tuple[torch.Tensor, np.ndarray]] = {}

    def __call__(self, name: str, tensor: torch.Tensor) -> np.ndarray:
        hit = self._views.get(name)
        if hit is None or hit[0] is not tensor:
            hit = self._views[name] = (tensor, tensor.numpy())
        return hit[1]

    def __getstate__(self) -> dict:
        return {"_views": {}}


class Postings:
    """One facet's posting lists: keys sorted (with their rows) plus an unsorted tail."""

    def __init__(self) -> None:
        self.keys = torch.empty(0, dtype=torch.int64)  # [P] ascending
        self.rows = torch.empty(0, dtype=torch.int64)  # [P]
        self.tail_keys = torch.empty(0, dtype=torch.int64)  # [T]
        self.tail_rows = torch.empty(0, dtype=torch.int64)
        self._offsets: tuple[int, torch.Tensor] | None = None  # (span, [P' + 1]) of the sorted part
        self._np = NumpyViews()

    def append(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        self.tail_keys = torch.cat([self.tail_keys, keys])
        self.tail_rows = torch.cat([self.tail_rows, rows])

    def compact(self, current_key: torch.Tensor) -> None:
        """Merge the tail in and drop entries whose row moved or died (``current_key`` -1)."""
        keys = torch.cat([self.keys, self.tail_keys])
        rows = torch.cat([self.rows, self.tail_rows])
        live = current_key[rows] == keys
        keys, rows = keys[live], rows[live]
        order = torch.argsort(keys, stable=True)
        self.keys, self.rows = keys[order], rows[order]
        self.tail_keys = self.tail_keys[:0]
        self.tail_rows = self.tail_rows[:0]
        self._offsets = None

    def offsets(self, span: int, num_prefixes: int) -> torch.Tensor:
        """CSR offsets ``[P' + 1]`` of the sorted part by prefix (``key // span``), cached.

        Rebuilt only after :meth:`compact` (the sorted part never changes in between), so a
        lookup reads a prefix's range with two gathers instead of two binary searches.
        """
        if self._offsets is None or self._offsets[0] != span:
            bounds = torch.arange(num_prefixes + 1, dtype=torch.int64) * span
            self._offsets = (span, torch.searchsorted(self.keys, bounds))
        return self._offsets[1]

    def gather_prefixes(self, prefix: torch.Tensor, span: int, num_prefixes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, row) pairs of every entry under ``prefix[q]`` (keys ``[p*span, (p+1)*span)``).

        ``prefix`` ``[Q]`` int64, -1 for "no prefix" (gathers nothing).
        """
        if num_prefixes > DENSE_PREFIXES:
            lo = prefix * span  # -1 gets the empty range [-span, 0)
            return self.gather(lo, lo + span)
        offsets = self.offsets(span, num_prefixes)
        p = prefix.clamp(min=0)
        start = take(offsets, p)
        end = torch.where(prefix >= 0, take(offsets, p + 1), start)
        return self._pairs(start, end, prefix * span, (prefix + 1) * span)

    def csr_views(self, span: int, num_prefixes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """numpy views (memoised) of what the compiled gather reads: CSR ``offsets`` by prefix,
        sorted ``rows``, and the unsorted ``tail_keys`` / ``tail_rows``."""
        views = self._np
        offsets = views("offsets", self.offsets(span, num_prefixes))
        return offsets, views("rows", self.rows), views("tail_keys", self.tail_keys), views("tail_rows", self.tail_rows)

    def gather(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, row) pairs for every entry with ``lo[q] <= key < hi[q]``, ``lo/hi`` ``[Q]``."""
        return self._pairs(torch.searchsorted(self.keys, lo), torch.searchsorted(self.keys, hi), lo, hi)

    def _pairs(self, start: torch.Tensor, end: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted-part positions ``[start[q], end[q])`` plus tail entries in ``[lo[q], hi[q])``."""
        counts = end - start  # [Q]
        query = torch.repeat_interleave(torch.arange(lo.numel()), counts)
        offsets = torch.cumsum(counts, 0) - counts
        pos = torch.arange(int(counts.sum())) - take(offsets, query) + take(start, query)
        rows = take(self.rows, pos)
        if self.tail_keys.numel():
            hit = (self.tail_keys.unsqueeze(0) >= lo.unsqueeze(1)) & (self.tail_keys.unsqueeze(0) < hi.unsqueeze(1))
            tq, tp = hit.nonzero(as_tuple=True)  # [Q, T] → pairs
            query = torch.cat([query, tq])
            rows = torch.cat([rows, self.tail_rows[tp]])
        return query, rows

    def __len__(self) -> int:
        return self.keys.numel() + self.tail_keys.numel()
