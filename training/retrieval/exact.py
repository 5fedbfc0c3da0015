"""Exact (brute-force) retrieval: score every item, keep the k best.

The ground truth the approximate retrievers are measured against, the eval harness's retriever
and the serving retriever. Torch only, so it runs wherever the model does.

Notation: B users, D embedding dim, N items, C items per chunk, k results.

Why each step is written the way it is:
- Items are stored sorted by raw ID. Excluded raw IDs map to rows with one ``searchsorted``
  (no per-item Python dict), and "lower row" then means "lower item ID", which gives ties a
  deterministic order: equal scores are returned by ascending item ID.
- ``torch.topk`` does not promise which of several tied elements it keeps, so when ties straddle
  the k-th place (rare with float scores, checked with one comparison pass) ``_top_k`` takes the
  tied elements at the boundary in ascending column order itself.
- Scores are computed in chunks of C items ([B, C] at a time, not [B, N]) so a large catalogue
  never needs a B x N score matrix; each chunk's top-k is merged into a running top-k. The merge
  keeps the ascending-ID tie order, so chunked and unchunked search return the same items (scores
  agree up to float rounding: BLAS may sum a [B, C] product in a different order than [B, N]).

Example::

    retriever = ExactRetriever(item_ids=torch.tensor([10, 20, 30]), item_emb=torch.eye(3))
    result = retriever.search(torch.tensor([[0.0, 1.0, 0.5]]), k=2, exclude=[torch.tensor([20])])
    result.item_ids  # tensor([[30, 10]])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from training.retrieval.exclude import excluded_positions
from training.retrieval.protocol import PAD_ITEM_ID, SearchResult, check_search_args

DEFAULT_CHUNK_SIZE = 65_536
"""Items scored at once: B x 65,536 float32 scores is 8 MiB for B = 32."""


def read_embedding_table(path: str | Path, id_column: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an index Parquet file (``<id_column>`` int64, ``embedding`` list<float32>).

    Used for ``index/items.parquet`` and ``index/users.parquet`` of a run folder.

    Returns:
        ids: [N] int64 raw IDs, in file order.
        emb: [N, D] float32 embeddings, row i belonging to ``ids[i]``.
    """
    table = pq.read_table(path, columns=[id_column, "embedding"])
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows, cannot infer the embedding dimension")
    ids = table.column(id_column).to_numpy().astype(np.int64, copy=False)
    emb_column = table.column("embedding").combine_chunks()
    lengths = pc.list_value_length(emb_column)
    dim = pc.min(lengths).as_py()
    if dim != pc.max(lengths).as_py() or dim == 0:
        raise ValueError(f"{path}: embeddings must all have the same non-zero length")
    # list_flatten honours slice offsets; the values come out row-major as [N * D].
    flat = pc.list_flatten(emb_column).to_numpy(zero_copy_only=False).astype(np.float32)
    emb = flat.reshape(len(ids), dim)  # [N, D]
    return torch.from_numpy(ids.copy()), torch.from_numpy(emb.copy())


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row with ties going to the lower column.

    Args:
        scores: [B, M] float32; NaN counts as -inf.
        k: 1 <= k <= M.

    Returns:
        values: [B, k] descending; among equal values, ascending column.
        cols: [B, k] int64 columns of ``scores``.
    """
    num_rows, width = scores.shape
    if width <= 4 * k:  # small (merges, tiny catalogues): a stable sort is cheap and exact
        scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
        values, cols = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :k], cols[:, :k]
    values, cols = torch.topk(scores, k, dim=1, sorted=False)  # [B, k]; topk ranks NaN first
    if bool(torch.isnan(values).any()):  # rare: pay for a full pass only when NaN is present
        return _top_k(scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")), k)
    kth = values.min(dim=1, keepdim=True).values  # [B, 1]
    if bool(((scores >= kth).sum(dim=1) > k).any()):
        # Ties straddle the k-th place and topk's pick among them is unspecified: keep everything
        # above the k-th value, then the tied elements in column order until the row has k.
        above = scores > kth  # [B, M]
        at = scores == kth  # [B, M]
        needed = k - above.sum(dim=1, keepdim=True)  # [B, 1]
        keep = above | (at & (at.cumsum(dim=1) <= needed))  # [B, M], exactly k per row
        cols = keep.nonzero()[:, 1].view(num_rows, k)  # [B, k]
    cols = cols.sort(dim=1).values  # [B, k] ascending columns, so the stable sort below ...
    values = scores.gather(1, cols)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # ... keeps ties by column
    return values.gather(1, order), cols.gather(1, order)


class ExactRetriever:
    """Brute-force dot-product retriever over an in-memory item table.

    Args:
        item_ids: [N] int64 raw item IDs, unique, any order.
        item_emb: [N, D] float32 item embeddings, row i for ``item_ids[i]``.
        chunk_size: items scored at once (C); bounds memory at B x C scores.
    """

    def __init__(
        self,
        item_ids: torch.Tensor,
        item_emb: torch.Tensor,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if item_ids.dim() != 1 or item_emb.dim() != 2 or item_emb.shape[0] != item_ids.shape[0]:
            raise ValueError(
                f"expected item_ids [N] and item_emb [N, D], got {tuple(item_ids.shape)} "
                f"and {tuple(item_emb.shape)}"
            )
        if item_ids.numel() == 0:
            raise ValueError("the catalogue is empty")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        sorted_ids, order = torch.sort(item_ids.to(torch.int64))
        if bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise ValueError("item_ids must be unique")
        self._sorted_ids = sorted_ids  # [N] ascending raw IDs
        self._item_emb = item_emb.to(torch.float32)[order].contiguous()  # [N, D], rows by ID
        self._chunk_size = chunk_size

    @classmethod
    def from_index_dir(cls, path: str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ExactRetriever:
        """Build from a run's ``index/`` folder (reads ``items.parquet``)."""
        item_ids, item_emb = read_embedding_table(Path(path) / "items.parquet", "item_id")
        return cls(item_ids, item_emb, chunk_size=chunk_size)

    @property
    def num_items(self) -> int:
        return self._sorted_ids.numel()

    @property
    def dim(self) -> int:
        return self._item_emb.shape[1]

    @property
    def item_ids(self) -> torch.Tensor:
        """[N] int64 raw item IDs, ascending."""
        return self._sorted_ids

    def search(
        self,
        user_emb: torch.Tensor,
        k: int,
        exclude: list[torch.Tensor] | None = None,
    ) -> SearchResult:
        """Top-k items by dot product; see ``training.retrieval.protocol`` for the contract."""
        batch = check_search_args(user_emb, k, exclude, self.dim)
        user_emb = user_emb.to(torch.float32)
        k_found = min(k, self.num_items)
        excluded_users, excluded_rows = self._excluded_rows(exclude, batch)

        best_scores = torch.empty(batch, 0)  # [B, <=k] running top-k
        best_rows = torch.empty(batch, 0, dtype=torch.int64)
        for start in range(0, self.num_items, self._chunk_size):
            end = min(start + self._chunk_size, self.num_items)
            scores = user_emb @ self._item_emb[start:end].T  # [B, C]
            in_chunk = (excluded_rows >= start) & (excluded_rows < end)
            scores[excluded_users[in_chunk], excluded_rows[in_chunk] - start] = float("-inf")
            chunk_scores, chunk_cols = _top_k(scores, min(k_found, end - start))  # [B, k_c]
            # Earlier chunks hold lower rows, so concatenating [best, chunk] keeps tied values in
            # ascending-row order, which _top_k's stable selection preserves.
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)  # [B, k + k_c]
            merged_rows = torch.cat([best_rows, chunk_cols + start], dim=1)
            best_scores, keep = _top_k(merged_scores, min(k_found, merged_scores.shape[1]))
            best_rows = merged_rows.gather(1, keep)  # [B, k_found]

        item_ids = self._sorted_ids[best_rows]  # [B, k_found]
        item_ids[torch.isneginf(best_scores)] = PAD_ITEM_ID  # excluded items that filled a row
        if k > k_found:  # catalogue smaller than k
            item_ids = torch.cat([item_ids, torch.full((batch, k - k_found), PAD_ITEM_ID)], dim=1)
            best_scores = torch.cat(
                [best_scores, torch.full((batch, k - k_found), float("-inf"))], dim=1
            )
        return SearchResult(
            item_ids=item_ids,
            scores=best_scores,
            stats={"items_scored": batch * self.num_items, "nodes_scored": 0},
        )

    def _excluded_rows(
        self, exclude: list[torch.Tensor] | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(user index [E], item row [E]) pairs to mask; IDs not in the catalogue are dropped."""
        return excluded_positions(exclude, self._sorted_ids)
