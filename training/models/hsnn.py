"""HSNN: a hierarchical item index learned jointly with a ranking-grade scorer (MoNN).

Two ideas in one retrieval model (issue 5):

* **The index is learned with the model.** Every item vector ``v`` is residual-quantized
  (``training.models.rq.ResidualQuantizer``, L levels x K codes, EMA codebooks): level 0 picks
  the nearest codeword, level 1 the nearest to what level 0 missed, and so on. The code prefix
  ``(c0, ..., cl)`` is the item's node at level l; the node's vector is the sum of its codewords.
  The codebooks follow the item vectors as they train (EMA), and the vectors are pulled to
  their codes (commitment), so tree and network move together.
* **Nodes and items are scored by the same network, richer than a dot product** (MoNN:
  a mixture of modules over the tree). For user state ``(u, H)`` (user vector ``[D]`` and the
  history sequence ``[T, D]``) and a target ``t`` (a node or an item vector, ``[D]``) at level l:

      t'    = t * (1 + a_l) + b_l                      per-level module (l = L: items)
      dot   = <u, t'>
      mlp   = w . relu(W_u u + W_t t' + (A u) * (C t'))        user, target and their interaction
      cross = sum_j softmax_j(<W_q t', W_k H_j>) <W_o t', W_v H_j>   cross-attention: history vs target
      score = dot + mlp + cross

  ``W_u u``, ``A u``, ``W_k H``, ``W_v H`` depend on the user only (:class:`UserState`,
  computed once per request); ``W_t t'``, ``C t'``, ``W_q t'``, ``W_o t'`` on the target only, so
  a node shared by all users is projected once (computation shared across nodes and users).

Training: one batch of (user, history, positive item) examples gives three losses,
in-batch sampled softmax over items (log-q corrected), softmax over each level's nodes (the
positive's code prefix against every node of the level while the level has at most B nodes,
else against the other examples' prefixes with same-node columns masked), and the RQ
commitment. Node loss teaches the scorer to route; item loss to rank. (Serving routes by default
with the item module at each node's mean item vector instead, ``node_scoring: item_mean``: at
1M items the node modules' routing lost half of the exhaustive top-100, see
``training/index/hsnn_index.py``.)

Notation: B batch, D dim, E table dim, T history length, L levels, K codes per level, M targets.

Example::

    model = build_hsnn(cfg.model, torch.device("meta"), history_len=50)   # then shard_model(...)
    loss, parts, _ = model(kjt, LossInputs(log_q, cfg.model))        # a DMP: gradients synced
    user_pack, item_pack = model(kjt)   # [B, D + T] (u ‖ history rows), [B, 2D] (v ‖ history key)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embeddings.tables import build_tables
from training.config import TableConfig, UserTowerChoice
from training.models.item_content import (
    CONTENT_FEATURES,
    ContentTableSizes,
    ItemContent,
    content_table_specs,
    pool_content,
)
from training.models.rq import ResidualQuantizer
from training.models.towers import mlp, pad_history
from training.models.user_tower import build_user_tower
from training.models.two_tower import in_batch_softmax, weighted_mean
from training.models.two_tower import table_specs as two_tower_table_specs


class HSNNModelConfig(ContentTableSizes, UserTowerChoice):
    """HSNN model (``kind: hsnn``).

    Args:
        dim: D, item/user/node vector dimension.
        embedding_dim: E, id table dimension.
        hidden: hidden widths of the user and item MLPs.
        scorer_hidden: H, hidden width of the MoNN interaction MLP.
        attention_dim: R, width of the cross-attention's queries, keys and values.
        temperature: softmax temperature of both in-batch losses.
        logq_correction: subtract log item frequency from item logits (Yi et al. 2019).
        levels / codes: L x K of the tree (16 x 16 for ml-100k).
        decay / commitment: RQ codebook EMA decay and commitment weight.
        node_loss_weight: weight of the per-level node losses.
        dot_loss_weight: weight of an auxiliary in-batch loss on ``<u, v>`` alone (keeps the
            towers as strong as a two-tower's, so the MoNN refines a good dot product).
        rebalance_every: steps between re-seeding dead codes / splitting big ones.
        dead_share / split_share: RQ balance thresholds (see ``ResidualQuantizer.rebalance``).
        beam: B, nodes kept per level at serving time.
        max_leaf_ratio: cap every tree node at this multiple of its level's mean size when the
            tree is built (``rq.capacity_encode``: items past a full node's capacity move to
            their next-nearest sibling); None codes greedily and leaves may grow without bound.
        node_scoring: how serving's beam search scores a node: ``item_mean`` (the item module
            at the mean vector of the node's items) or ``codebook`` (the level's node module at
            the node's codeword sum); see ``training/index/hsnn_index.py`` for why item_mean.
        user_cardinality / item_cardinality: distinct ids the tables are sized for.
        content: the item tower also reads the item's content (genres, release-year bucket and
            title words, ``training.models.item_content``): ``[id row ‖ 3 pooled content rows]``
            ``[B, 4E]`` → MLP, instead of the id row alone. Items that share content then start
            near each other, and the MoNN sees what an item is, not only who engaged with it.
        genre_cardinality / year_cardinality / title_cardinality: content table sizes (with
            ``content``; :class:`~training.models.item_content.ContentTableSizes`).
    """

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(64, gt=0)
    embedding_dim: int = Field(64, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [128])
    scorer_hidden: int = Field(64, gt=0)
    attention_dim: int = Field(16, gt=0)
    temperature: float = Field(0.05, gt=0)
    logq_correction: bool = True
    levels: int = Field(2, ge=2)
    codes: int = Field(16, ge=2)
    decay: float = Field(0.95, gt=0, lt=1)
    commitment: float = Field(0.25, ge=0)
    node_loss_weight: float = Field(0.5, ge=0)
    dot_loss_weight: float = Field(0.0, ge=0)
    rebalance_every: int = Field(50, gt=0)
    dead_share: float = Field(0.1, ge=0)
    split_share: float = Field(4.0, gt=1)
    beam: int = Field(4, gt=0)
    max_leaf_ratio: float | None = Field(None, ge=1)
    node_scoring: Literal["item_mean", "codebook"] = "item_mean"
    user_cardinality: int = Field(2_000, gt=0)
    item_cardinality: int = Field(4_000, gt=0)
    content: bool = False
    tables: TableConfig = Field(default_factory=TableConfig)


# ---------------------------------------------------------------- the scorer (MoNN)
@dataclass
class UserState:
    """What the scorer needs of a batch of users, computed once per request.

    Args:
        u: ``[B, D]`` user vector.
        history: ``[B, T, D]`` history item keys (zeros where padded).
        mask: ``[B, T]`` bool, True where a history item is present.
        projections: user-only projections filled by :meth:`MoNNScorer.prepare`:
            ``u_proj``/``u_inter`` ``[B, H]``, ``keys``/``values`` ``[B, T, R]``.
    """

    u: torch.Tensor
    history: torch.Tensor
    mask: torch.Tensor
    projections: dict[str, torch.Tensor] | None = None

    def select(self, index: torch.Tensor | slice) -> UserState:
        """The users at ``index`` (``[b]`` rows or a slice) of every tensor, projections included."""
        projections = None if self.projections is None else {k: v[index] for k, v in self.projections.items()}
        return UserState(self.u[index], self.history[index], self.mask[index], projections)


class MoNNScorer(nn.Module):
    """Scores (user, target) pairs for any level of the tree; see the module docstring.

    Why factorised: the interaction ``W_x (u * t)`` is computed as ``(A u) * (C t)`` (a rank-H
    bilinear form, as in factorisation machines) and the cross-attention works in R << D
    dims, so scoring M targets for B users costs O(B M (H + T R)) instead of O(B M D (H + T)).

    Args:
        dim: D.
        hidden: H, width of the interaction MLP.
        levels: L; the scorer holds L + 1 per-level modules (nodes of each level, then items).
        attention_dim: R, query/key/value width of the cross-attention.

    Example::

        scorer = MoNNScorer(dim=64, hidden=64, levels=2)
        state = scorer.prepare(UserState(u, history, mask))    # once per request
        node_scores = scorer(state, codebook0, level=0)          # [B, K]  (shared targets [K, D])
        item_scores = scorer(state, cand_vectors, level=2)       # [B, M]  (per-user targets [B, M, D])
    """

    def __init__(self, dim: int, hidden: int, levels: int, attention_dim: int = 16) -> None:
        super().__init__()
        self.dim, self.hidden, self.levels, self.attention_dim = dim, hidden, levels, attention_dim
        self.level_scale = nn.Parameter(torch.zeros(levels + 1, dim))
        self.level_bias = nn.Parameter(torch.zeros(levels + 1, dim))
        self.user_in = nn.Linear(dim, hidden)
        self.target_in = nn.Linear(dim, hidden, bias=False)
        self.user_inter = nn.Linear(dim, hidden, bias=False)
        self.target_inter = nn.Linear(dim, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)
        self.query = nn.Linear(dim, attention_dim, bias=False)
        self.key = nn.Linear(dim, attention_dim, bias=False)
        self.value = nn.Linear(dim, attention_dim, bias=False)
        self.target_value = nn.Linear(dim, attention_dim, bias=False)
        # both extra terms start at zero: the scorer starts as the dot product and learns on top
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.target_value.weight)

    def prepare(self, state: UserState) -> UserState:
        """Fill the user-only projections (once per request, shared by every node and item)."""
        projections = {
            "u_proj": self.user_in(state.u),  # [B, H]
            "u_inter": self.user_inter(state.u),  # [B, H]
            "keys": self.key(state.history),  # [B, T, R]
            "values": self.value(state.history),  # [B, T, R]
        }
        return UserState(state.u, state.history, state.mask, projections)

    def forward(self, state: UserState, targets: torch.Tensor, level: int) -> torch.Tensor:
        """Scores ``[B, M]`` of targets ``[M, D]`` (shared by all users) or ``[B, M, D]`` (per user)."""
        return self.score(state, self.project(targets, level))

    @property
    def projected_dim(self) -> int:
        """P = D + 2H + 2R, the width of :meth:`project`'s rows."""
        return self.dim + 2 * self.hidden + 2 * self.attention_dim

    def project(self, targets: torch.Tensor, level: int) -> torch.Tensor:
        """Every target-only term of the score, packed: ``[..., D]`` → ``[..., P]`` holding
        ``t'``, ``W_t t'``, ``C t'``, ``W_q t'``, ``W_o t'`` (in that order).

        Why packed and separate: a serving index projects its fixed items and nodes once per
        build (``HSNNIndex``) and then only gathers rows, one index op per block instead of
        four matmuls per (user, candidate); training projects fresh vectors every step.
        """
        t = targets * (1 + self.level_scale[level]) + self.level_bias[level]  # [..., D]
        return torch.cat([t, self.target_in(t), self.target_inter(t), self.query(t), self.target_value(t)], dim=-1)

    def score(self, state: UserState, projected: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, M]`` of projected targets ``[M, P]`` (shared) or ``[B, M, P]`` (per user)."""
        if state.projections is None:
            state = self.prepare(state)
        p = state.projections
        t, t_in, t_inter, q, o = projected.split(
            [self.dim, self.hidden, self.hidden, self.attention_dim, self.attention_dim], dim=-1
        )
        shared = t.dim() == 2
        dot = state.u @ t.T if shared else torch.einsum("bd,bmd->bm", state.u, t)  # [B, M]
        hidden = F.relu(p["u_proj"].unsqueeze(1) + t_in + p["u_inter"].unsqueeze(1) * t_inter)  # [B, M, H]
        mlp_score = self.out(hidden).squeeze(-1)  # [B, M]
        # cross-attention: each target queries the user's history; the value it reads is scored
        # against the target, so only [B, M, T] scalars are formed
        eq = "mr,btr->bmt" if shared else "bmr,btr->bmt"
        logits = torch.einsum(eq, q, p["keys"]) / self.attention_dim**0.5  # [B, M, T]
        # finite fill: a user with no history gets uniform weights over zero values (score 0), not NaN
        attn = torch.softmax(logits.masked_fill(~state.mask.unsqueeze(1), -1e9), dim=-1)
        read = torch.einsum(eq, o, p["values"])  # [B, M, T]: <W_o t_m, W_v H_j>
        cross = (attn * read).sum(-1)  # [B, M]
        return dot + mlp_score + cross


# ---------------------------------------------------------------- the model
@dataclass
class LossInputs:
    """Asks :meth:`HSNN.forward` for the training loss: ``log_q`` ``[B]`` (or None), the model
    config and the example weights ``[B]`` (1 or 0; None: all 1; a 0 row is padding and trains
    nothing, ``training.data.feedback_examples``)."""

    log_q: torch.Tensor | None
    cfg: HSNNModelConfig
    weight: torch.Tensor | None = None


class NodeFrequency(nn.Module):
    """Streaming estimate of how often each tree node is a training example's node, per level.

    Why: a level with more nodes than the batch is trained with in-batch softmax, where a node
    is a negative as often as its items are sampled. Without the log-q correction the node
    scorer learns popularity-free (PMI-like) scores, while the item scorer (corrected) ranks
    by the full softmax; beam search then descends to niche nodes and misses the items the
    item scorer would rank first (on the 1M-item catalogue: beam Recall@100 0.03 against 0.23
    exhaustive). The item-level log q comes from the data (:class:`training.data.loader.LogQ`);
    a node's depends on the tree as it is learned, so it is counted as training goes: an
    exponential moving average of node ids per step (the streaming frequency estimate of
    Yi et al., RecSys 2019, kept dense since K^(l+1) is at most a few 100k).

    Args:
        sizes: node count of each level, ``[K, K^2, ..]``.
        decay: EMA decay per step (0.999: about the last 1,000 steps).
    """

    def __init__(self, sizes: list[int], decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        for level, size in enumerate(sizes):
            # not persistent: a resumed run re-estimates it within ~1/(1 - decay) steps
            self.register_buffer(f"count_{level}", torch.zeros(size), persistent=False)

    @torch.no_grad()
    def update_and_log_q(self, level: int, node_ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Count this batch's nodes ``[B]`` (each row ``weight`` times; None: once); return their
        log sampling probability ``[B]``."""
        count = getattr(self, f"count_{level}")
        seen = torch.bincount(node_ids, weights=weight, minlength=count.numel()).to(count.dtype)
        count.mul_(self.decay).add_(seen, alpha=1 - self.decay)
        return torch.log(count[node_ids] / count.sum())


class HSNN(nn.Module):
    """Towers over MPZCH tables + MoNN scorer + the RQ tree.

    Args:
        tables: MPZCH collection, tables ``user`` (``user_id``) and ``item`` (``item_id``,
            ``history``), dim E; with ``content`` also ``genre``, ``year`` and ``title``.
        towers: ``nn.ModuleDict`` with ``user`` (the shared user tower, ``model.user_tower``,
            → ``[B, D]``), ``item`` (``[B, E]``, or ``[B, 4E]`` with content → ``[B, D]``) and ``history``
            (``[H, E]`` → ``[H, D]``, the history key: history items are read by id only).
        scorer: :class:`MoNNScorer`.
        quantizer: ``ResidualQuantizer(D, L, K)``: the tree's codebooks.
        history_len: T.
        content: whether the item tower reads content (call :meth:`set_content` on every rank).
    """

    def __init__(
        self, tables, towers: nn.ModuleDict, scorer: MoNNScorer, quantizer: ResidualQuantizer, history_len: int,
        content: bool = False,
    ) -> None:
        super().__init__()
        self.uses_content = content
        self.content = ItemContent(torch.empty(0, dtype=torch.int64), {}, {})  # data, not state: set_content
        self.tables = tables
        self.towers = towers
        self.scorer = scorer
        self.quantizer = quantizer
        self.history_len = history_len
        levels, codes = quantizer.codebooks.shape[0], quantizer.codebooks.shape[1]
        self.node_frequency = NodeFrequency([codes ** (level + 1) for level in range(levels)])
        self.register_buffer("catalogue", torch.empty(0, dtype=torch.int64), persistent=False)

    def set_content(self, content: ItemContent) -> None:
        """The item → content tokens lookup (a model built with ``content`` needs it on every rank)."""
        self.content = content

    def set_catalogue(self, item_ids: torch.Tensor) -> None:
        """Raw ids of the catalogue; the user pack refers to history items by row of ``sorted(item_ids)``."""
        self.catalogue = torch.sort(item_ids.to(torch.int64)).values

    # ------------------------------------------------------------ pieces
    def _rows(self, kjt: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        """Table rows of the batch's features, plus its items' content features with ``content``."""
        rows, _ = self.tables(self.content.attach(kjt) if self.uses_content else kjt)
        return rows

    def _user_state(self, rows: dict[str, JaggedTensor], batch_size: int) -> UserState:
        history_rows = rows["history"]
        u = F.normalize(self.towers["user"](rows["user_id"].values(), history_rows), dim=-1)  # [B, D]
        padded, mask = pad_history(history_rows, batch_size, self.history_len)  # [B, T, E]
        keys = F.normalize(self.towers["history"](padded), dim=-1) * mask.unsqueeze(-1)  # [B, T, D]
        return UserState(u, keys, mask)

    def _item_vectors(self, rows: dict[str, JaggedTensor], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item vector ``[B, D]`` (what the tree quantizes and the scorer scores) and history key ``[B, D]``
        of a batch whose every row has one item."""
        item_rows = rows["item_id"].values()  # [B, E]
        tower_in = item_rows
        if self.uses_content:
            tower_in = torch.cat([item_rows, pool_content(rows, batch_size)], dim=1)  # [B, 4E]
        return F.normalize(self.towers["item"](tower_in), dim=-1), F.normalize(self.towers["history"](item_rows), dim=-1)

    def _history_catalogue_rows(self, history: JaggedTensor, batch_size: int) -> torch.Tensor:
        """History raw ids → catalogue rows ``[B, T]`` (-1 where padded or unknown), most recent last."""
        n = self.catalogue.numel()
        if n == 0:
            raise RuntimeError("call set_catalogue(item_ids) before embedding users")
        raw = history.values().to(torch.int64)  # [H]
        pos = torch.searchsorted(self.catalogue, raw).clamp(max=n - 1)
        rows = torch.where(self.catalogue[pos] == raw, pos, torch.full_like(pos, -1))
        padded, _ = pad_history(JaggedTensor(values=(rows + 1).unsqueeze(1), lengths=history.lengths()), batch_size, self.history_len)
        return padded.squeeze(-1) - 1  # [B, T]; padding (0 after the mask) becomes -1

    # ------------------------------------------------------------ forward passes
    def forward(self, kjt: KeyedJaggedTensor, loss: LossInputs | None = None):
        """Embed what the batch carries, or (``loss`` given) the training loss of the batch.

        The loss goes through ``forward`` so that a DMP/DDP-wrapped model syncs its gradients.
        Without ``loss``, the shape ``training.eval.distributed.embed_rows`` expects:

        Returns:
            user pack ``[B, D + T]`` = ``u ‖ history catalogue rows`` (as float, -1 padded; the
            layout :class:`training.index.hsnn_index.HSNNIndex` reads) when ``user_id`` has one id
            per row, else None; item pack ``[B, 2D]`` = ``v ‖ history key`` when ``item_id`` has.
        """
        if loss is not None:
            return self.training_loss(kjt, loss.log_q, loss.cfg, loss.weight)
        batch_size = kjt.stride()
        rows = self._rows(kjt)
        user = item = None
        if rows["user_id"].values().shape[0] == batch_size and batch_size > 0:
            state = self._user_state(rows, batch_size)
            history_rows = self._history_catalogue_rows(kjt["history"], batch_size)
            user = torch.cat([state.u, history_rows.to(state.u.dtype)], dim=1)
        if rows["item_id"].values().shape[0] == batch_size and batch_size > 0:
            item = torch.cat(self._item_vectors(rows, batch_size), dim=1)
        return user, item

    def training_loss(
        self, kjt: KeyedJaggedTensor, log_q: torch.Tensor | None, cfg: HSNNModelConfig, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Item + node + commitment loss of one batch (updates the codebooks: collective).
        ``weight`` ``[B]``: a 0 row is padding, in no loss, no codebook and no node count.

        Returns the loss, its parts (floats, for logging) and the batch's item vectors ``[B, D]``
        (detached: the pool the quantizer rebalances on).

        Reach it through ``model(kjt, LossInputs(...))`` on a DMP, every rank the same number of times.
        """
        batch_size = kjt.stride()
        rows = self._rows(kjt)
        state = self.scorer.prepare(self._user_state(rows, batch_size))
        v, _ = self._item_vectors(rows, batch_size)  # [B, D]
        item_ids = kjt["item_id"].values()
        rq = self.quantizer(v, weight)  # EMA update (all-reduced), codes [B, L]
        item_logits = self.scorer(state, v, level=cfg.levels)  # [B, B]
        item_loss = in_batch_softmax(item_logits, item_ids, log_q, cfg.temperature, weight)
        node_loss = torch.zeros(())
        prefix_id = torch.zeros(batch_size, dtype=torch.int64)
        prefix_vec = torch.zeros_like(v)
        codebooks = self.quantizer.codebooks.detach()  # [L, K, D]
        all_nodes = codebooks[0]  # [K, D]: every node of the current level
        for level in range(cfg.levels):
            prefix_id = prefix_id * cfg.codes + rq.codes[:, level]
            prefix_vec = prefix_vec + codebooks[level][rq.codes[:, level]]
            if level > 0:
                all_nodes = (all_nodes.unsqueeze(1) + codebooks[level].unsqueeze(0)).flatten(0, 1)  # [K^(l+1), D]
            if all_nodes.shape[0] <= batch_size:
                # full softmax over every node of the level (what beam search ranks), cheaper than in-batch
                logits = self.scorer(state, all_nodes, level=level) / cfg.temperature  # [B, K^(l+1)]
                node_loss = node_loss + weighted_mean(F.cross_entropy(logits, prefix_id, reduction="none"), weight)
            else:
                logits = self.scorer(state, prefix_vec, level=level)  # [B, B]: user b vs example j's node
                node_log_q = self.node_frequency.update_and_log_q(level, prefix_id, weight) if log_q is not None else None
                node_loss = node_loss + in_batch_softmax(logits, prefix_id, node_log_q, cfg.temperature, weight)
        node_loss = node_loss / cfg.levels
        loss = item_loss + cfg.node_loss_weight * node_loss + rq.commitment
        parts = {"loss/item": float(item_loss.detach()), "loss/node": float(node_loss.detach()), "loss/commitment": float(rq.commitment.detach())}
        if cfg.dot_loss_weight > 0:
            dot_loss = in_batch_softmax(state.u @ v.T, item_ids, log_q, cfg.temperature, weight)
            loss = loss + cfg.dot_loss_weight * dot_loss
            parts["loss/dot"] = float(dot_loss.detach())
        return loss, parts, v.detach()


def table_specs(cfg: HSNNModelConfig):
    """The two-tower's tables (``user``; ``item`` for item ids and history), plus the content
    tables when the item tower reads content."""
    return [*two_tower_table_specs(cfg), *(content_table_specs(cfg) if cfg.content else [])]


def build_hsnn(cfg: HSNNModelConfig, device: torch.device, history_len: int) -> HSNN:
    """An :class:`HSNN` from its config; tables on ``device`` (use "meta" before DMP).

    ``history_len`` is T, the history the user state carries (the run's ``data.history_len``).
    """
    tables = build_tables(table_specs(cfg), device=device)
    e, d = cfg.embedding_dim, cfg.dim
    dense_device = torch.device("cpu") if device.type == "meta" else device
    towers = nn.ModuleDict(
        {
            "user": build_user_tower(cfg, out_dim=d),
            "item": mlp([e * (1 + len(CONTENT_FEATURES) * cfg.content), *cfg.hidden, d]),
            "history": nn.Linear(e, d),
        }
    ).to(dense_device)
    scorer = MoNNScorer(d, cfg.scorer_hidden, cfg.levels, cfg.attention_dim).to(dense_device)
    quantizer = ResidualQuantizer(d, cfg.levels, cfg.codes, decay=cfg.decay, commitment=cfg.commitment).to(dense_device)
    return HSNN(tables, towers, scorer, quantizer, history_len, content=cfg.content)
