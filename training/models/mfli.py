"""MFLI: two towers whose item side has several facets, each co-trained with its own RQ index.

MFLI (multifaceted learnable index) trains the item embeddings and a residual codebook per facet
together; the codes *are* the index (``training.index.mfli_index``), so serving walks the codes
instead of building an ANN index after training.

Towers (notation: B rows, E table dim, D facet dim, F = 2 facets):

- user: the shared user tower (``model.user_tower``: ``mean`` of the history rows or
  ``sequential`` attention over them, :mod:`training.models.user_tower`) → ``[B, F*D]``, each facet's D
  columns L2-normalised.
- item, **engagement** facet (collaborative): ``[item row ‖ content]`` ``[B, 4E]`` → MLP → ``[B, D]``.
- item, **semantic** facet (content only): ``content`` ``[B, 3E]`` → MLP → ``[B, D]``, where
  content = mean rows of the item's genres, its release-year bucket and its title tokens. With no
  id row in it, a new item gets a semantic vector from its content alone (cold start).

``forward`` returns ``(user, item)`` with the facets concatenated (``[B, F*D]`` each), so the
score is the sum of the facet dot products and the shared eval/export code
(``training.eval.distributed``, ``training.export``) works on MFLI unchanged.

Content features (genres, year bucket, title words) are id features over their own MPZCH
tables; ``training.models.item_content`` hashes them and looks them up per item.

Loss (:func:`mfli_loss`): in-batch softmax with log-q on the combined score, plus per facet the
same loss on the facet alone and on its straight-through quantized vector (so the retrieval
loss sees the codes), plus the RQ commitment losses.

Example::

    model = build_mfli(cfg.model, device=torch.device("cpu"))
    model.set_content(ItemContent.from_items(items_table))
    user, item = model(kjt)                               # [B, 2D], [B, 2D]
    loss, parts = mfli_loss(model, user, item, item_ids, log_q, cfg.model)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import TableSpec, build_tables
from training.config import TableConfig, UserTowerChoice
from training.models.item_content import (
    CONTENT_FEATURES,
    ContentTableSizes,
    ItemContent,
    content_table_specs,
    pool_content,
)
from training.models.rq import ResidualQuantizer
from training.models.two_tower import in_batch_softmax_loss, mlp
from training.models.user_tower import build_user_tower
from training.models.two_tower import table_specs as two_tower_table_specs

FACETS: tuple[str, ...] = ("engagement", "semantic")


class MFLIModelConfig(ContentTableSizes, UserTowerChoice):
    """MFLI model and index settings.

    Args:
        dim: D, each facet's output dimension (the embedding is F*D wide).
        embedding_dim: E, every id table's dimension.
        hidden: hidden widths of each tower MLP.
        temperature / logq_correction: of the in-batch softmax (as the two-tower).
        user_cardinality / item_cardinality: distinct ids each table is sized for; the content
            tables' sizes come from :class:`~training.models.item_content.ContentTableSizes`.
        levels / codes: L and K of each facet's residual codebook.
        ema_decay / commitment: codebook EMA decay and commitment weight beta.
        facet_loss_weight: weight of each facet's own retrieval loss.
        code_loss_weight: weight of each facet's retrieval loss on its quantized vector.
        rebalance_every: steps between dead-code re-seeding / splitting passes.
        dead_share / split_share: a code is dead under ``dead_share / K`` of the items and
            oversized above ``split_share / K``.
        beam / depth: lookup beam width and levels descended before gathering (eval).
    """

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, gt=0)
    embedding_dim: int = Field(64, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [128])
    temperature: float = Field(0.05, gt=0)
    logq_correction: bool = True
    user_cardinality: int = Field(2_000, gt=0)
    item_cardinality: int = Field(4_000, gt=0)
    tables: TableConfig = Field(default_factory=TableConfig)
    levels: int = Field(3, gt=0, le=8)
    codes: int = Field(64, ge=2, le=4096)
    ema_decay: float = Field(0.95, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    facet_loss_weight: float = Field(0.5, ge=0)
    code_loss_weight: float = Field(0.5, ge=0)
    rebalance_every: int = Field(50, gt=0)
    dead_share: float = Field(0.1, ge=0)
    split_share: float = Field(3.0, gt=1)
    beam: int = Field(16, gt=0)
    depth: int = Field(1, gt=0)


# ---------------------------------------------------------------- the model
class MFLI(nn.Module):
    """Two towers with an engagement and a semantic item facet, plus one RQ per facet.

    Args:
        tables: MPZCH collection with tables ``user``, ``item`` (``item_id``, ``history``),
            ``genre``, ``year``, ``title``, all of dim E.
        user_mlp: the user tower (``model.user_tower``, :func:`~training.models.user_tower.build_user_tower`) → ``[B, F*D]``.
        item_mlps: ``{"engagement": [B, 4E] → [B, D], "semantic": [B, 3E] → [B, D]}``.
        quantizers: facet → :class:`ResidualQuantizer` over D.
    """

    def __init__(
        self,
        tables: ManagedCollisionEmbeddingCollection,
        user_mlp: nn.Module,
        item_mlps: nn.ModuleDict,
        quantizers: nn.ModuleDict,
    ) -> None:
        super().__init__()
        self.tables = tables
        self.user_mlp = user_mlp
        self.item_mlps = item_mlps
        self.quantizers = quantizers
        self.content = ItemContent(torch.empty(0, dtype=torch.int64), {}, {})  # data, not state: set_content

    @property
    def facet_dim(self) -> int:
        return next(iter(self.quantizers.values())).dim

    def set_content(self, content: ItemContent) -> None:
        """The item → content tokens lookup (set it on every rank; new items: set a larger one)."""
        self.content = content

    def forward(self, kjt: KeyedJaggedTensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Embed whatever the batch carries (keys ``user_id``, ``item_id``, ``history``).

        Returns:
            user ``[B, F*D]`` when ``user_id`` has one id per row, else None; item ``[B, F*D]``
            when ``item_id`` has one id per row, else None. Each facet block L2-normalised.
        """
        batch_size = kjt.stride()
        rows, _ = self.tables(self.content.attach(kjt))
        user = item = None
        if rows["user_id"].values().shape[0] == batch_size and batch_size > 0:
            u = self.user_mlp(rows["user_id"].values(), rows["history"])  # [B, F*D]
            user = F.normalize(u.view(batch_size, len(FACETS), -1), dim=-1).flatten(1)
        if rows["item_id"].values().shape[0] == batch_size and batch_size > 0:
            pooled = pool_content(rows, batch_size)  # [B, 3E]
            engagement = self.item_mlps["engagement"](torch.cat([rows["item_id"].values(), pooled], dim=1))
            semantic = self.item_mlps["semantic"](pooled)
            item = torch.cat([F.normalize(engagement, dim=-1), F.normalize(semantic, dim=-1)], dim=1)  # [B, 2D]
        return user, item


def facet_slices(dim: int) -> dict[str, slice]:
    """Columns of each facet in the concatenated ``[B, F*D]`` embedding."""
    return {name: slice(i * dim, (i + 1) * dim) for i, name in enumerate(FACETS)}


def mfli_loss(
    quantizers: nn.ModuleDict,
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None,
    cfg: MFLIModelConfig,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Retrieval + RQ loss of one batch; runs the quantizers (EMA update: collective in training).

    Args:
        quantizers: the model's facet quantizers (``MFLI.quantizers``).
        user, item: ``[B, F*D]`` from :meth:`MFLI.forward`; item_ids ``[B]``; log_q ``[B]`` or None.
        weight: ``[B]`` 1 or 0, None: all 1. A 0 row is padding: no loss of its own, no negative
            for the others (``in_batch_softmax_loss``), no commitment and no codebook update.
    Returns:
        the loss and its parts as floats (for logging).
    """
    t = cfg.temperature
    loss = in_batch_softmax_loss(user, item, item_ids, log_q, t, weight)
    parts = {"loss/combined": float(loss.detach())}
    for name, cols in facet_slices(cfg.dim).items():
        u, x = user[:, cols], item[:, cols]
        rq = quantizers[name](x, weight)
        facet = in_batch_softmax_loss(u, x, item_ids, log_q, t, weight)
        coded = in_batch_softmax_loss(u, rq.quantized, item_ids, log_q, t, weight)
        loss = loss + cfg.facet_loss_weight * facet + cfg.code_loss_weight * coded + rq.commitment
        parts.update({f"loss/{name}": float(facet.detach()), f"loss/{name}_coded": float(coded.detach()),
                      f"loss/{name}_commitment": float(rq.commitment.detach())})
    return loss, parts


def table_specs(cfg: MFLIModelConfig) -> list[TableSpec]:
    """MFLI's id tables: user, item (+ history) and the three content features."""
    return [*two_tower_table_specs(cfg), *content_table_specs(cfg)]


def build_mfli(cfg: MFLIModelConfig, device: torch.device) -> MFLI:
    """An :class:`MFLI` from its config; tables on ``device`` (use "meta" before DMP)."""
    tables = build_tables(table_specs(cfg), device=device)
    e, d = cfg.embedding_dim, cfg.dim
    dense = torch.device("cpu") if device.type == "meta" else device
    user_mlp = build_user_tower(cfg, out_dim=len(FACETS) * d).to(dense)
    item_mlps = nn.ModuleDict({
        "engagement": mlp([e + len(CONTENT_FEATURES) * e, *cfg.hidden, d]),
        "semantic": mlp([len(CONTENT_FEATURES) * e, *cfg.hidden, d]),
    }).to(dense)
    quantizers = nn.ModuleDict({
        name: ResidualQuantizer(d, cfg.levels, cfg.codes, cfg.ema_decay, cfg.commitment) for name in FACETS
    }).to(dense)
    return MFLI(tables, user_mlp, item_mlps, quantizers)
