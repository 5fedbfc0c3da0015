"""Layers every tower shares: an MLP, the mean of a jagged history, and a padded history.

A history reaches a model as the ``history`` feature's jagged table rows (a ``JaggedTensor``
with values ``[H, E]`` and one length per batch row, each row oldest first, see
:func:`training.data.loader.build_examples`). Pooling towers average it (:func:`mean_pool`);
attention towers need it as a dense, masked ``[B, T, E]`` block (:func:`pad_history`).

Notation: B batch rows, E table dim, H total history ids in the batch, T padded length.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mean_pool(jt: JaggedTensor, batch_size: int) -> torch.Tensor:
    """Mean of each row's jagged embeddings ``[H, E]`` → ``[B, E]`` (zeros for empty rows)."""
    lengths = jt.lengths().to(torch.int64)
    values = jt.values()
    row = torch.repeat_interleave(torch.arange(batch_size, device=values.device), lengths)
    summed = torch.zeros(batch_size, values.shape[1], dtype=values.dtype, device=values.device)
    summed.index_add_(0, row, values)
    return summed / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)


def pad_history(jt: JaggedTensor, batch_size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged history rows ``[H, E]`` → the ``length`` most recent, padded ``[B, T, E]`` + mask ``[B, T]``.

    Histories are oldest first, so the most recent items are each row's tail; they land
    left-aligned (a row of n < T items fills slots ``0..n-1``, its most recent item in slot
    n-1), padded slots are zeros and False in the mask.
    """
    values = jt.values()
    lengths = jt.lengths().to(torch.int64).clamp(max=length)
    offsets = jt.offsets().to(torch.int64)
    pos = torch.arange(length, device=values.device).unsqueeze(0)  # [1, T]
    mask = pos < lengths.unsqueeze(1)  # [B, T]
    start = offsets[1:] - lengths  # [B] first kept element
    index = (start.unsqueeze(1) + pos).clamp(max=max(values.shape[0] - 1, 0))  # [B, T]
    if values.shape[0] == 0:
        return torch.zeros(batch_size, length, values.shape[1], dtype=values.dtype, device=values.device), mask
    padded = values[index.reshape(-1)].reshape(batch_size, length, -1) * mask.unsqueeze(-1)
    return padded, mask
