"""The one retriever protocol: exact search, MFLI, HSNN and FAISS all answer `search`.

Notation: B users in a batch, D embedding dim, N items in the catalogue, k results per user.
IDs are raw 64-bit item IDs (never row numbers), so every retriever can be swapped for another
without the caller knowing how it stores its items.

Padding: when a user has fewer than k candidate items (k > N minus that user's excluded items),
the tail of the row is padded with ``PAD_ITEM_ID`` (-1) and a score of ``-inf``. Callers drop
padded entries with ``result.item_ids >= 0`` (or ``torch.isfinite(result.scores)``).

Example::

    result = retriever.search(user_emb, k=10, exclude=[torch.tensor([7, 42]), torch.tensor([])])
    result.item_ids  # [2, 10] int64, best first, -1 where padded
    result.scores    # [2, 10] float32, descending, -inf where padded
    result.stats     # {"items_scored": ..., "nodes_scored": ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

PAD_ITEM_ID = -1
"""Item ID that fills a result row past the last real candidate (its score is -inf)."""


@dataclass(frozen=True)
class SearchResult:
    """Top-k items for a batch of users.

    Args:
        item_ids: [B, k] int64 raw item IDs, best first; ``PAD_ITEM_ID`` where padded.
        scores: [B, k] float32 scores matching ``item_ids``, non-increasing along each row;
            ``-inf`` where padded.
        stats: work done for the whole batch (summed over the B users), so retrievers can be
            compared on cost as well as recall: ``items_scored`` counts (user, item) scores
            computed, ``nodes_scored`` counts (user, tree/cluster node) scores computed (0 for
            retrievers without a hierarchy).
    """

    item_ids: torch.Tensor
    scores: torch.Tensor
    stats: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Retriever(Protocol):
    """Anything that returns the k best items for a batch of user embeddings."""

    def search(
        self,
        user_emb: torch.Tensor,
        k: int,
        exclude: list[torch.Tensor] | None = None,
    ) -> SearchResult:
        """Top-k items per user.

        Args:
            user_emb: [B, D] float32 user embeddings.
            k: results per user (>= 1); rows are padded when fewer candidates exist.
            exclude: optional list of B int64 tensors; ``exclude[b]`` holds raw item IDs never
                to return for user b (e.g. items already seen). Unknown IDs are ignored.
        """
        ...


def check_search_args(user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None, dim: int | None = None) -> int:
    """Validate a ``search`` call the way every retriever must (a bad call is a ValueError that
    names the argument, not an index error deep in a kernel); returns the batch size.

    Args:
        user_emb: ``[B, dim]`` (``dim`` None: any width, e.g. HSNN's user pack).
        k: items asked per user (>= 1).
        exclude: None or one id tensor per user.
    """
    if user_emb.dim() != 2 or (dim is not None and user_emb.shape[1] != dim):
        raise ValueError(f"expected user_emb [B, {dim if dim is not None else 'D'}], got {tuple(user_emb.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    batch = user_emb.shape[0]
    if exclude is not None and len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} entries for a batch of {batch}")
    return batch
