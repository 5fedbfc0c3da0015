"""Two-tower retrieval over MPZCH id tables: the skeleton model every retriever is compared to.

User tower (``model.user_tower``, :mod:`training.models.user_tower`): ``mean``, the user's id
row and the mean of their history items' rows → MLP, or ``sequential``, causal self-attention
over the ordered history (:mod:`training.models.sequential`); L2-normalised ``[B, D]``. Item
tower: the item's id row → MLP → ``[B, D]``. Score = dot product. Trained with in-batch sampled
softmax and the log-q correction.

Both towers read one :class:`ManagedCollisionEmbeddingCollection` (tables ``user`` for
``user_id`` and ``item`` for ``item_id`` and ``history``), so a sharded model does one
embedding lookup per step. Every call passes all three keys; a tower's unused keys are empty
(see :func:`training.data.loader.to_kjt`).

Notation: B batch rows, E table dim, D output dim, H total history ids in the batch.

Example::

    model = build_two_tower(cfg.model, device=torch.device("meta"))
    user, item = model(kjt)                  # [B, D], [B, D]
    loss = in_batch_softmax_loss(user, item, item_ids, log_q, temperature=0.05)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import TableSpec, build_tables
from training.models.towers import mean_pool, mlp  # noqa: F401  (mean_pool: re-exported, other models import it from here)
from training.models.user_tower import build_user_tower


class TwoTower(nn.Module):
    """Two towers over one MPZCH embedding collection.

    Args:
        tables: MPZCH-managed collection with tables ``user`` (feature ``user_id``) and
            ``item`` (features ``item_id``, ``history``), all of dim E.
        user_mlp: the user tower, ``(id rows [B, E], history rows [H, E]) → [B, D]``
            (:func:`training.models.user_tower.build_user_tower`; the name is the older one,
            kept so checkpoints still load).
        item_mlp: maps ``[B, E]`` to ``[B, D]``.
    """

    def __init__(self, tables: ManagedCollisionEmbeddingCollection, user_mlp: nn.Module, item_mlp: nn.Module) -> None:
        super().__init__()
        self.tables = tables
        self.user_mlp = user_mlp
        self.item_mlp = item_mlp

    def forward(self, kjt: KeyedJaggedTensor, every_position: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Embed whatever the batch carries.

        ``every_position`` (all-position training of the sequential tower): ``item_id`` holds one
        target per history item (row b's targets follow its history items one for one) and the
        result is ``(user [H, D], item [H, D])``, the user vector after each history item and the
        item that followed it. It is a flag of this one forward, not a second method, because DMP
        (and the DDP around the towers) sync gradients only through ``forward``.

        Returns:
            user ``[B, D]`` when ``user_id`` has one id per row, else None; item ``[B, D]`` when
            ``item_id`` has one id per row, else None. Both L2-normalised.
        """
        batch_size = kjt.stride()
        rows, _ = self.tables(kjt)
        if every_position:
            user = self.user_mlp.every_position(rows["user_id"].values(), rows["history"])  # [H, D]
            return F.normalize(user, dim=-1), F.normalize(self.item_mlp(rows["item_id"].values()), dim=-1)
        user = item = None
        user_rows = rows["user_id"]
        if user_rows.values().shape[0] == batch_size and batch_size > 0:
            user = F.normalize(self.user_mlp(user_rows.values(), rows["history"]), dim=-1)
        item_rows = rows["item_id"]
        if item_rows.values().shape[0] == batch_size and batch_size > 0:
            item = F.normalize(self.item_mlp(item_rows.values()), dim=-1)
        return user, item


def in_batch_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: Optional[torch.Tensor],
    temperature: float,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives over dot products: :func:`in_batch_softmax` of
    ``user @ item.T`` (``user``: ``[B, D]``; ``item``: ``[B, D]``)."""
    return in_batch_softmax(user @ item.T, item_ids, log_q, temperature, weight)


def in_batch_softmax(
    scores: torch.Tensor,
    ids: torch.Tensor,
    log_q: Optional[torch.Tensor],
    temperature: float,
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sampled softmax over a ``[B, B]`` score matrix whose diagonal holds the positives (a dot
    product here; HSNN's MoNN scores, which are not one, ``training.models.hsnn``).

    logits[i, j] = scores[i, j] / T - log q_j; row i's positive is column i. Columns holding the
    same id as row i's positive (other than i itself) are masked: they are not negatives.

    Args:
        scores: ``[B, B]``; ids: raw ids of the positives ``[B]``; log_q: ``[B]`` or None.
        weight: ``[B]`` 1 or 0, None: all 1. A 0 row is padding (a batch filled up to its
            size, ``training.data.feedback_examples``): no loss of its own and no negative for
            the others, so it trains nothing. The loss is the mean over the 1 rows.
    """
    logits = scores / temperature  # [B, B]
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    same = ids.unsqueeze(0) == ids.unsqueeze(1)
    if weight is not None:
        same = same | (weight == 0).unsqueeze(0)  # [B, B]: padding columns are no negatives
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(scores.shape[0], device=scores.device)
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weight)


def weighted_mean(per_row: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_row`` ``[B]`` over the rows of weight 1 (all rows when ``weight`` is None)."""
    if weight is None:
        return per_row.mean()
    return (per_row * weight).sum() / weight.sum().clamp(min=1)


def table_specs(cfg) -> list[TableSpec]:
    """The two-tower's tables from its model config (``TwoTowerModelConfig``)."""
    common = cfg.tables.spec_kwargs(cfg.embedding_dim)
    return [
        TableSpec(name="user", features=["user_id"], cardinality=cfg.user_cardinality, **common),
        TableSpec(name="item", features=["item_id", "history"], cardinality=cfg.item_cardinality, **common),
    ]


def build_two_tower(cfg, device: torch.device) -> TwoTower:
    """A :class:`TwoTower` from ``TwoTowerModelConfig``; tables on ``device`` (use "meta" before DMP)."""
    tables = build_tables(table_specs(cfg), device=device)
    e, d = cfg.embedding_dim, cfg.dim
    dense_device = torch.device("cpu") if device.type == "meta" else device
    user_mlp = build_user_tower(cfg, out_dim=d).to(dense_device)
    item_mlp = mlp([e, *cfg.hidden, d]).to(dense_device)
    return TwoTower(tables, user_mlp, item_mlp)
