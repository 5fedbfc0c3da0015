"""Which (user, item) pairs a search must not return: the one seen-item mask every retriever uses.

Each retriever keeps its items in some sorted order (exact search and HSNN by raw id, MFLI by a
lazily rebuilt id → row lookup); a request's ``exclude`` holds raw ids per user, some of them
unknown to the index. Mapping them to positions by binary search keeps the mask O(E log N) with
no Python loop over ids.

Example::

    users, pos = excluded_positions([torch.tensor([7, 42]), torch.tensor([5])], sorted_ids)
    scores[users, pos] = float("-inf")        # for a dense [B, N] score matrix in id order
"""

from __future__ import annotations

import torch


def excluded_positions(exclude: list[torch.Tensor] | None, sorted_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(user index ``[E]``, position in ``sorted_ids`` ``[E]``) of every excluded id the index holds.

    Args:
        exclude: B int64 tensors of raw item ids (any shape; flattened), one per user; None or
            empty: nothing excluded.
        sorted_ids: ``[N]`` int64 raw ids, ascending.

    Ids absent from ``sorted_ids`` are dropped; a user's duplicates stay (harmless to a mask).
    """
    empty = torch.empty(0, dtype=torch.int64)
    if not exclude or sorted_ids.numel() == 0:
        return empty, empty
    flat = [ids.reshape(-1).to(torch.int64) for ids in exclude]
    lengths = torch.tensor([ids.numel() for ids in flat])  # [B]
    raw = torch.cat(flat)  # [E]
    pos = torch.searchsorted(sorted_ids, raw).clamp_(max=sorted_ids.numel() - 1)
    known = sorted_ids[pos] == raw
    users = torch.repeat_interleave(torch.arange(len(flat)), lengths)
    return users[known], pos[known]
