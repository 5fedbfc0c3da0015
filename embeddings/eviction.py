"""Eviction resets the row: a reassigned slot must not hand the old id's vector or optimizer
state to the new id.

When MPZCH evicts an id (TTL expired, or LRU in a full probe window) the slot goes to a new id.
Upstream TorchRec 1.8 resets nothing for an unsharded collection (``evict()`` is a stub), and
its sharded reset calls ``fbgemm::reset_weight_momentum``, which has no CPU kernel. These
helpers do the reset on plain tensors, so both paths work on CPU; CUDA tables keep upstream's
kernel.

A reset row gets a fresh draw from the table's initial distribution (uniform in
``[-sqrt(1/rows), sqrt(1/rows)]``, TorchRec's default) and every optimizer state of that row
(Adagrad sums, row-wise Adagrad accumulators, Adam moments) is zeroed.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def init_bound(total_rows: int) -> float:
    """Half-width of TorchRec's default uniform initialisation for a table of ``total_rows``."""
    return math.sqrt(1.0 / total_rows)


@torch.no_grad()
def reset_rows_(
    weight: torch.Tensor,
    rows: torch.Tensor,
    bound: float,
    states: Iterable[torch.Tensor] = (),
    generator: Optional[torch.Generator] = None,
) -> None:
    """Re-initialise ``weight[rows]`` and zero those rows of every optimizer state, in place.

    Args:
        weight: ``[R, D]`` table rows (a parameter or a view into a fused kernel's buffer).
        rows: ``[E]`` int64 local row indices.
        bound: uniform initialisation half-width.
        states: optimizer state tensors of the same table, ``[R, D]`` or row-wise ``[R]``
            (others, e.g. step counters, are left alone).
        generator: RNG for the fresh rows (None: the global one).
    """
    if rows.numel() == 0:
        return
    rows = rows.to(device=weight.device, dtype=torch.int64)
    fresh = torch.empty(rows.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
    fresh.uniform_(-bound, bound, generator=generator)
    weight[rows] = fresh
    for state in states:
        if state.dim() >= 1 and state.shape[0] == weight.shape[0]:
            state[rows] = 0


def optimizer_states(param: torch.Tensor) -> list[torch.Tensor]:
    """State tensors the in-backward optimizers (``apply_optimizer_in_backward``) keep for ``param``."""
    out: list[torch.Tensor] = []
    for optimizer in getattr(param, "_in_backward_optimizers", []):
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out
