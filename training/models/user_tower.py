"""The user-tower seam: one builder the two-tower, MFLI and HSNN call for their user side.

Every retriever embeds a user from the same two inputs, the ``user_id`` table row ``[B, E]``
and the ``history`` feature's jagged item rows ``[H, E]`` (oldest first), so the tower that
turns them into ``[B, D]`` is chosen by config (``model.user_tower``) in one place:

- ``mean`` (:class:`MeanPoolUserTower`): ``[id row ‖ mean of history rows]`` → MLP. Order-free.
- ``sequential`` (:class:`training.models.sequential.SequentialUserTower`): causal
  self-attention over the ordered history with positions (SASRec family).

Example::

    tower = build_user_tower(cfg.model, out_dim=cfg.model.dim)
    user = tower(rows["user_id"].values(), rows["history"])   # [B, D]
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from training.config import UserTowerChoice
from training.models.sequential import build_sequential_tower
from training.models.towers import mean_pool, mlp


class UserTower(Protocol):
    """What a retriever calls: ``(user rows [B, E], history JaggedTensor [H, E]) → [B, D]``."""

    def __call__(self, user_rows: torch.Tensor, history: JaggedTensor) -> torch.Tensor: ...


class MeanPoolUserTower(nn.Sequential):
    """``[id row ‖ mean(history rows)]`` ``[B, 2E]`` → MLP → ``[B, D]``.

    It *is* the MLP (an ``nn.Sequential`` of its layers), so its parameter names are those the
    models' ``user_mlp`` had before this seam existed and older checkpoints still load.
    """

    def forward(self, user_rows: torch.Tensor, history: JaggedTensor) -> torch.Tensor:  # type: ignore[override]
        pooled = mean_pool(history, user_rows.shape[0])  # [B, E]
        return super().forward(torch.cat([user_rows, pooled], dim=1))


def build_user_tower(cfg: UserTowerChoice, out_dim: int) -> nn.Module:
    """The user tower ``cfg.user_tower`` names; ``cfg`` also gives ``embedding_dim`` (E) and ``hidden``."""
    e, hidden = cfg.embedding_dim, list(cfg.hidden)  # type: ignore[attr-defined]
    if cfg.user_tower == "sequential":
        return build_sequential_tower(cfg.sequence, e, hidden, out_dim)
    return MeanPoolUserTower(*mlp([2 * e, *hidden, out_dim]))
