"""Eviction resets the row: a reassigned slot must not hand the old id's vector or optimizer
state to the new id.

When MPZCH evicts an id (TTL expired, or LRU in a full probe window) the slot goes to a new id.
Upstream TorchRec 1.8 resets nothing for an unsharded collection (``evict()`` is a stub), and
its sharded reset calls ``fbgemm::reset_weight_momentum``, which has no CPU kernel. These
helpers do the reset on plain tensors, so both paths work on CPU; CUDA tables keep upstream's
kernel.

A reset row gets a fresh draw from the table's own initialisation, its config's ``init_fn``
(TorchRec fills that in with its default, uniform in ``[-sqrt(1/rows), sqrt(1/rows)]`` over the
*whole* table's rows, when none is given), and every optimizer state of that row (Adagrad sums,
row-wise Adagrad accumulators, Adam moments) is zeroed. The config is the unsharded table's,
so a row-wise shard redraws from the same distribution as the table was initialised with, not
one sized by its local row count.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

InitFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


def table_init_fn(config: BaseEmbeddingConfig) -> InitFn:
    """The initialisation a table's rows were drawn from: its ``init_fn`` (TorchRec's
    ``__post_init__`` sets the default uniform one over ``num_embeddings``, the global rows)."""
    if config.init_fn is not None:
        return config.init_fn
    low, high = config.get_weight_init_min(), config.get_weight_init_max()
    return lambda tensor: torch.nn.init.uniform_(tensor, low, high)


@torch.no_grad()
def reset_rows_(
    weight: torch.Tensor,
    rows: torch.Tensor,
    init_fn: InitFn,
    states: Iterable[torch.Tensor] = (),
) -> None:
    """Re-initialise ``weight[rows]`` and zero those rows of every optimizer state, in place.

    Args:
        weight: ``[R, D]`` table rows (a parameter or a view into a fused kernel's buffer).
        rows: ``[E]`` int64 local row indices.
        init_fn: the table's initialiser (:func:`table_init_fn`), applied to a fresh ``[E, D]``
            tensor, as upstream's sharded eviction does; it may fill in place or return rows.
            So it must be row-independent (uniform, normal, constant), which TorchRec already
            assumes when it applies ``init_fn`` to each row-wise shard separately.
        states: optimizer state tensors of the same table, ``[R, D]`` or row-wise ``[R]``
            (others, e.g. step counters, are left alone).
    """
    if rows.numel() == 0:
        return
    rows = rows.to(device=weight.device, dtype=torch.int64)
    fresh = torch.empty(rows.numel(), weight.shape[1], dtype=weight.dtype, device=weight.device)
    drawn = init_fn(fresh)
    weight[rows] = fresh if drawn is None else drawn.to(weight.dtype)
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
