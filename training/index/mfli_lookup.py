"""One user's MFLI lookup, compiled: beam search over a facet's codes, posting gather, top-k.

Why compiled (numba) rather than numpy or torch: a lookup is memory access and control flow over
a few hundred small arrays, not arithmetic. In numpy it took ~70 calls per query at 1-3 us of
dispatch each, so a beam-8 lookup at 1M items spent ~0.4 ms mostly dispatching, slower than
FAISS IVF at nprobe 1; each call here is one compiled loop. The loops also do what array code
cannot do cheaply:

* beam search expands a prefix's children best first and stops as soon as neither this child
  nor any later prefix can enter the beam (prefixes and children are visited in descending
  score order), instead of ranking all ``b x K`` children;
* the gather marks rows in a per-thread stamp array, so the union over facets is deduplicated
  in the same pass with no sort;
* top-k keeps a k-slot min-heap and checks the excluded ids only for candidates that would
  enter it.

Results match :meth:`training.index.mfli_index.MFLIIndex.search`'s batched torch path
(``tests/training/test_mfli_index.py`` checks they agree in every postings state). The kernels
release the GIL, so serving threads look up in parallel; ``cache=True`` keeps the machine code
on disk, so only a process's first call after an install compiles (~2 s).

Shapes: D_f a facet's dim, L levels, K codes per level, b beam, P prefixes (K^depth), R rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# numba compiles on first call; these are shared by every kernel below
_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def _sift_down(values: np.ndarray, keys: np.ndarray, size: int) -> None:
    """Restore the min-heap property of ``values[:size]`` (with ``keys``) from the root."""
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            return
        child = left
        if left + 1 < size and values[left + 1] < values[left]:
            child = left + 1
        if values[child] >= values[i]:
            return
        values[i], values[child] = values[child], values[i]
        keys[i], keys[child] = keys[child], keys[i]
        i = child


@njit(**_JIT)
def _push(values: np.ndarray, keys: np.ndarray, size: int, value: float, key: int) -> int:
    """Offer (value, key) to a min-heap of capacity ``len(values)``; returns the new size.

    A full heap replaces its minimum (the caller checked ``value`` beats it).
    """
    if size < len(values):
        i = size
        values[i], keys[i] = value, key
        while i > 0:
            parent = (i - 1) // 2
            if values[parent] <= values[i]:
                break
            values[i], values[parent] = values[parent], values[i]
            keys[i], keys[parent] = keys[parent], keys[i]
            i = parent
        return size + 1
    values[0], keys[0] = value, key
    _sift_down(values, keys, size)
    return size


@njit(**_JIT)
def _best_first(values: np.ndarray, keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The heap's entries sorted by value, best first."""
    order = np.argsort(-values[:size], kind="mergesort")
    return values[:size][order], keys[:size][order]


@njit(fastmath=True, **_JIT)
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` in float32, summed in whatever order vectorises (fastmath: SIMD lanes)."""
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(**_JIT)
def beam_prefixes(
    user: np.ndarray, codebooks: np.ndarray, occupancy: np.ndarray, beam: int, depth: int
) -> np.ndarray:
    """The best ``<= beam`` non-empty prefixes of length ``depth``, best first.

    Args:
        user: ``[D_f]`` float32, the user's facet vector.
        codebooks: ``[L, K, D_f]`` float32.
        occupancy: the dense 0 / -inf tables of prefix lengths 1..depth laid end to end
            (``[K + K^2 + ...]``): entry ``start(d) + p`` is 0 when prefix p of length d holds
            an item.
        beam, depth: b and the number of levels descended.

    Returns ``[<= b]`` int64 prefix keys (``c0 K^(d-1) + ... + c_{d-1}``). A prefix scores the
    sum of its codewords' dot products with ``user``, as in ``mfli_beam.beam_search``.
    """
    num_codes = codebooks.shape[1]
    child = np.empty(num_codes, dtype=np.float32)
    for j in range(num_codes):
        child[j] = _dot(codebooks[0, j], user)
    values = np.empty(min(beam, num_codes), dtype=np.float32)
    keys = np.empty(len(values), dtype=np.int64)
    size = 0
    for j in range(num_codes):
        if occupancy[j] == 0.0 and (size < len(values) or child[j] > values[0]):
            size = _push(values, keys, size, child[j], j)
    best, prefix = _best_first(values, keys, size)
    start, span = 0, num_codes
    for level in range(1, depth):
        start += span
        span *= num_codes
        for j in range(num_codes):
            child[j] = _dot(codebooks[level, j], user)
        order = np.argsort(-child, kind="mergesort")
        top_child = child[order[0]]
        values = np.empty(min(beam, len(prefix) * num_codes), dtype=np.float32)
        keys = np.empty(len(values), dtype=np.int64)
        size = 0
        for i in range(len(prefix)):  # parents best first: once the best child of this parent
            if size == len(values) and best[i] + top_child <= values[0]:  # misses, all later do
                break
            base = prefix[i] * num_codes
            for jj in range(num_codes):  # children best first: stop at the first that misses
                j = order[jj]
                value = best[i] + child[j]
                if size == len(values) and value <= values[0]:
                    break
                if occupancy[start + base + j] == 0.0:
                    size = _push(values, keys, size, value, base + j)
        best, prefix = _best_first(values, keys, size)
    return prefix


@njit(**_JIT)
def gather_rows(
    prefix: np.ndarray,
    offsets: np.ndarray,
    rows: np.ndarray,
    tail_keys: np.ndarray,
    tail_rows: np.ndarray,
    key: np.ndarray,
    stale: bool,
    span: int,
    mark: np.ndarray,
    stamp: int,
) -> np.ndarray:
    """Rows under ``prefix`` not yet marked with ``stamp`` (and mark them), one facet.

    Args:
        prefix: ``[b]`` prefix keys; an entry with key k lies under prefix ``k // span``.
        offsets, rows: CSR of the facet's sorted postings by prefix: ``rows[offsets[p]:
            offsets[p + 1]]`` lie under p.
        tail_keys, tail_rows: unsorted postings appended since the last compaction.
        key: ``[R]`` each row's current key in this facet (-1 absent); consulted when
            ``stale`` (postings may hold removed or re-coded rows) to skip outdated entries.
        mark, stamp: ``[R]`` per-thread scratch; a row is taken once per ``stamp`` across the
            facets of one lookup.
    """
    total = len(tail_rows)
    for p in prefix:
        total += offsets[p + 1] - offsets[p]
    out = np.empty(total, dtype=np.int64)
    n = 0
    for p in prefix:
        for pos in range(offsets[p], offsets[p + 1]):
            r = rows[pos]
            if mark[r] != stamp and (not stale or (key[r] >= 0 and key[r] // span == p)):
                mark[r] = stamp
                out[n] = r
                n += 1
    if len(tail_keys):
        sorted_prefix = np.sort(prefix)
        for t in range(len(tail_keys)):
            p = tail_keys[t] // span
            pos = np.searchsorted(sorted_prefix, p)
            if pos == len(sorted_prefix) or sorted_prefix[pos] != p:
                continue
            r = tail_rows[t]
            if mark[r] != stamp and (not stale or (key[r] >= 0 and key[r] // span == p)):
                mark[r] = stamp
                out[n] = r
                n += 1
    return out[:n]


@njit(**_JIT)
def top_k(
    emb: np.ndarray, user: np.ndarray, candidates: np.ndarray, ids: np.ndarray, exclude: np.ndarray, k: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of ``candidates`` by ``emb[row] . user``, excluded ids left out.

    Args:
        emb: ``[R, D]`` float32; user ``[D]``; candidates ``[C]`` rows; ids ``[R]`` item ids.
        exclude: ``[E]`` item ids never returned (any order).

    Returns item ids ``[k]`` int64 and scores ``[k]`` float32, best first, padded with
    ``pad_id`` / -inf when fewer than k candidates remain.
    """
    seen = np.sort(exclude)
    values = np.empty(k, dtype=np.float32)
    rows = np.empty(k, dtype=np.int64)
    size = 0
    for c in candidates:
        score = _dot(emb[c], user)
        if size == k and score <= values[0]:
            continue
        if len(seen):
            pos = np.searchsorted(seen, ids[c])
            if pos < len(seen) and seen[pos] == ids[c]:
                continue
        size = _push(values, rows, size, score, c)
    best, picked = _best_first(values, rows, size)
    out_ids = np.full(k, pad_id, dtype=np.int64)
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    for i in range(size):
        out_ids[i] = ids[picked[i]]
        out_scores[i] = best[i]
    return out_ids, out_scores
