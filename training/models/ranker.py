"""The multi-task ranker (MTML) with its MBD branch and the foundation-model input.

One forward pass, for B (user, candidate) pairs:

1. ids → one MPZCH :class:`ManagedCollisionEmbeddingCollection` (tables ``user``: ``user_id``;
   ``item``: ``item_id`` and ``history``), the same builder as the two-tower
   (:func:`embeddings.tables.build_tables`), sharded row-wise by DMP in training;
2. small categorical cohort features (bucket ids such as item length decile, a handful of
   values each, not id features) → :class:`CohortEmbeddings` ``[B, C·E_c]``;
3. FM embedding ``[B, D_fm]``: precomputed (serving), computed in this pass (training, or
   "synchronous FM"), or missing → a learned *missing* embedding (plus, with
   ``foundation.impute``, an MLP's estimate of the FM embedding from the ranker's own features,
   distilled from the FM), and a 0/1 indicator;
4. :class:`RankerArch`: [user row ‖ item row ‖ history mean ‖ dense ‖ cohorts ‖ FM ‖ indicator]
   → shared bottom (or MMoE) → one logit per task;
5. :class:`training.models.mbd.MBDBranch` on the configured cohort subset (its own cohort
   embeddings by default, see :class:`MBDConfig`) → (μ, σ²) per debiased signal.

Tasks: ``binary`` (BCE on logits, prediction = sigmoid) or ``regression`` (MSE or Huber,
optionally on log1p of the target, prediction back in natural units).

Serving artifact (``runs/<id>/ranker/``, written by :func:`export_ranker`, read by
:func:`load_ranker`; no TorchScript, an unsharded copy)::

    model.pt                 torch.save of the unsharded RankingModel state_dict (id rows,
                             MPZCH identities/metadata, dense weights)
    ranker.json              {"model": RankerModelConfig, "value": ValueConfig, "dense_names",
                              "cohort_sizes", "tasks": {name: kind}, "history_len", "version"}
    user_features.parquet    user_id, dense list<float32>, cohorts list<int64>
    item_features.parquet    item_id, dense, cohorts
    histories.parquet        user_id, history list<int64> (train+valid, newest last)

Notation: B pairs, E id-table dim, F dense features, C cohort features, T tasks, S debiased
signals, D_fm FM width.

Example::

    model = build_ranking_model(cfg.model, features, device=torch.device("cpu"))
    out = model(kjt, dense, cohorts, fm_keep=torch.ones(B, dtype=torch.bool))
    out.predictions["like"], out.mbd_mean["watch_time"], out.mbd_var["watch_time"]   # [B] each
    scorer = load_ranker(run.path / "ranker")
    out = scorer.score(user_id, candidate_ids, fm=None)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils import _pytree as pytree
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import TableSpec, build_tables, set_mpzch_training
from training.config import TableConfig
from training.data.loader import FEATURES, to_kjt
from training.data.ranking_examples import FeatureTables, batch_arrays, histories_of
from training.models.foundation import FoundationArchSpec, FoundationModel
from training.models.calibration import PathCalibration
from training.models.mbd import MBDBranch, MBDSignal, target_scale
from training.models.two_tower import mean_pool, mlp
from training.models.two_tower import table_specs as two_tower_table_specs
from training.models.value import ValueConfig


# ---------------------------------------------------------------- config
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Section):
    """One prediction task.

    Args:
        name: a task of the data source (``training.data.ranking_examples.TASKS``).
        loss: "bce" (binary tasks), "mse" or "huber" (regression).
        log_target: regress log1p(y) (heavy-tailed targets); predictions come back as expm1.
        weight: the task's share of the loss.
    """

    name: str
    loss: Literal["bce", "mse", "huber"] = "bce"
    log_target: bool = False
    weight: float = Field(1.0, ge=0)


class MBDConfig(_Section):
    """The MBD branch: which signals, which cohort ("partial feature set"), how isolated.

    Args:
        signals: task name → family ("gaussian" or "lognormal").
        cohort: cohort feature names (of the dataset's cohort features) the heads see.
        hidden: head MLP widths.
        embeddings: "own" (default): MBD has its own cohort embedding tables, trained by its
            loss alone, so it is isolated from the trunk by construction. "shared": the heads
            read the ranker's cohort embeddings. Why "own" is the default: the trunk also sees
            dense features (log item length), learns the bias from those and leaves its bucket
            embeddings barely trained; MBD heads on them fitted the cohort means poorly (corr
            0.83 with the empirical cell means on synth) and left a third of the length bias in
            the debiased value (docs/benchmarks/ranking.md).
        stop_gradient: with shared embeddings, detach them so MBD's loss does not reshape the
            trunk (on by default; off is the ablation).
        weight: the MBD loss's share of the total loss.
    """

    signals: dict[str, Literal["gaussian", "lognormal"]] = Field(default_factory=dict)
    cohort: list[str] = Field(default_factory=list)
    hidden: list[int] = Field(default_factory=lambda: [32])
    embeddings: Literal["own", "shared"] = "own"
    stop_gradient: bool = True
    weight: float = Field(1.0, ge=0)


class FoundationConfig(_Section):
    """The foundation model and how the ranker consumes it.

    Args:
        enabled: build the FM (off: the ranker has no FM input at all).
        dim / layers / heads: FM width, depth, attention heads.
        dropout: probability that a training row's FM embedding is replaced by the missing
            embedding; "uniform" draws that probability from U(0, 1) per batch, so the ranker
            sees every hit rate.
        weight: the FM's own task loss share.
        impute: the missing path estimates the FM embedding from the ranker's features (see
            :class:`RankerArch`); off (the default, and what older artifacts were trained
            with): one learned missing embedding.
        impute_weight: the distillation loss's share (:func:`imputation_loss`).
    """

    enabled: bool = True
    dim: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    dropout: float | Literal["uniform"] = "uniform"
    weight: float = Field(1.0, ge=0)
    impute: bool = False
    impute_weight: float = Field(1.0, ge=0)


class RankerModelConfig(_Section):
    """The ranker's model section.

    Args:
        tasks: prediction tasks, in head order.
        arch: "shared_bottom" or "mmoe".
        embedding_dim: id table dim E; cohort_dim: E_c per cohort feature.
        hidden: shared bottom (or each MMoE expert) widths; experts: MMoE experts.
        user_cardinality / item_cardinality: distinct ids the MPZCH tables are sized for.
    """

    tasks: list[TaskConfig]
    arch: Literal["shared_bottom", "mmoe"] = "shared_bottom"
    embedding_dim: int = Field(32, gt=0)
    cohort_dim: int = Field(8, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    experts: int = Field(4, gt=0)
    user_cardinality: int = Field(2_000, gt=0)
    item_cardinality: int = Field(4_000, gt=0)
    tables: TableConfig = Field(default_factory=TableConfig)
    mbd: MBDConfig = Field(default_factory=MBDConfig)
    foundation: FoundationConfig = Field(default_factory=FoundationConfig)


# ---------------------------------------------------------------- modules
@dataclass
class RankerOutput:
    """What one forward pass returns; every tensor is ``[B]`` unless noted.

    ``predictions``: probability (binary, per-path calibrated: :mod:`training.models.calibration`)
    or natural-unit value (regression) per task; ``raw_predictions``: the same before
    calibration (what MBD z-scores standardise);
    ``logits``: the raw head outputs (log space for log targets); ``mbd_mean`` / ``mbd_var``:
    cohort statistics per debiased signal (in the MBD family's space); ``fm_logits`` ``[B, T]``
    when the FM ran in this pass; ``fm_present`` bool; ``fm_imputed`` ``[B, D_fm]`` the
    imputer's estimate of the FM embedding and ``fm_embedding`` ``[B, D_fm]`` the FM's own (both
    only when the ranker has an imputer and the FM ran or was given: the distillation pair).
    """

    predictions: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    mbd_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    mbd_var: dict[str, torch.Tensor] = field(default_factory=dict)
    fm_logits: torch.Tensor | None = None
    fm_present: torch.Tensor | None = None
    raw_predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    fm_imputed: torch.Tensor | None = None
    fm_embedding: torch.Tensor | None = None


# DMP wraps the dense part in DDP with ``static_graph=True``, which all-reduces gradients only
# through the tensors it finds in the forward's output (a pytree walk). A plain dataclass is an
# opaque leaf to that walk, so without this registration each rank would silently train its own
# dense weights.
pytree.register_dataclass(RankerOutput)


class CohortEmbeddings(nn.Module):
    """One small table per cohort feature: bucket ids ``[B, C]`` → ``[B, C, E_c]``.

    Args:
        sizes: bucket count per cohort feature, in column order.
        dim: E_c.
    """

    def __init__(self, sizes: list[int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in sizes)

    def forward(self, cohorts: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(cohorts[:, i].clamp(0, t.num_embeddings - 1)) for i, t in enumerate(self.tables)], 1)


class MMoE(nn.Module):
    """Multi-gate mixture of experts: ``[B, I]`` → one ``[B, H]`` per task (Ma et al. 2018).

    Args:
        in_dim: I; hidden: expert widths (last = H); experts: count; tasks: gates.
    """

    def __init__(self, in_dim: int, hidden: list[int], experts: int, tasks: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(mlp([in_dim, *hidden]), nn.ReLU()) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(in_dim, experts) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        e = torch.stack([expert(x) for expert in self.experts], 1)  # [B, X, H]
        return [(F.softmax(g(x), -1).unsqueeze(-1) * e).sum(1) for g in self.gates]


class RankerArch(nn.Module):
    """The dense part: features (+ FM or its missing embedding) → one logit per task.

    Args:
        in_dim: width of [user ‖ item ‖ history ‖ dense ‖ cohorts] (without the FM part).
        fm_dim: FM embedding width (0: no FM input).
        tasks: T.
        hidden: bottom / expert widths.
        experts: 0 for a shared bottom, else MMoE with this many experts.
        impute: the missing path reads an estimate of the FM embedding from the ranker's own
            features (an MLP distilled from the FM, :func:`ranking_loss`) instead of one learned
            constant, so a cache miss loses less than the whole FM gain.
    """

    def __init__(
        self, in_dim: int, fm_dim: int, tasks: int, hidden: list[int], experts: int = 0, impute: bool = False
    ) -> None:
        super().__init__()
        self.fm_dim = fm_dim
        width = in_dim + (fm_dim + 1 if fm_dim else 0)
        if fm_dim:
            self.missing_fm = nn.Parameter(torch.zeros(fm_dim))
        self.imputer = nn.Sequential(mlp([in_dim, hidden[0]]), nn.ReLU(), nn.Linear(hidden[0], fm_dim)) if fm_dim and impute else None
        self.mmoe = MMoE(width, hidden, experts, tasks) if experts else None
        self.bottom = None if experts else nn.Sequential(mlp([width, *hidden]), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], 1) for _ in range(tasks))

    def forward(
        self, features: torch.Tensor, fm: torch.Tensor | None, fm_present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``features`` ``[B, in_dim]``, ``fm`` ``[B, D_fm]`` or None, ``fm_present`` ``[B]`` →
        (logits ``[B, T]``, the imputer's FM estimate ``[B, D_fm]`` or None)."""
        imputed = None
        if self.fm_dim:
            present = fm_present.unsqueeze(1)  # [B, 1]
            missing = self.missing_fm.expand(features.shape[0], -1)
            if self.imputer is not None:
                imputed = self.imputer(features.detach())  # [B, D_fm]; the trunk is not reshaped by it
                missing = missing + imputed
            fm_in = missing if fm is None else torch.where(present, fm.detach(), missing)  # [B, D_fm]
            features = torch.cat([features, fm_in, present.to(features.dtype)], 1)
        if self.mmoe is not None:
            per_task = self.mmoe(features)
        else:
            shared = self.bottom(features)
            per_task = [shared] * len(self.heads)
        return torch.cat([head(h) for head, h in zip(self.heads, per_task)], 1), imputed


class RankingModel(nn.Module):
    """Tables + cohort embeddings + ranker arch + MBD + optional FM (see module docstring).

    Args:
        tables: MPZCH collection (``user``: user_id; ``item``: item_id, history).
        cohorts: :class:`CohortEmbeddings`.
        arch: :class:`RankerArch`.
        mbd: :class:`MBDBranch` (or None) and the cohort columns it reads.
        foundation: :class:`FoundationModel` or None.
        mbd_cohorts: MBD's own :class:`CohortEmbeddings` over those columns (None: the heads
            read ``cohorts``, the ranker's).
        calibration: per-task, per-path logit maps for the binary tasks' ``predictions`` (None
            or unfitted: identity).
    """

    def __init__(
        self,
        tables: ManagedCollisionEmbeddingCollection,
        cohorts: CohortEmbeddings,
        arch: RankerArch,
        mbd: tuple[MBDBranch, list[int]] | None,
        foundation: FoundationModel | None,
        mbd_cohorts: CohortEmbeddings | None = None,
        calibration: PathCalibration | None = None,
    ) -> None:
        super().__init__()
        self.tables = tables
        self.cohorts = cohorts
        self.arch = arch
        self.mbd = mbd[0] if mbd else None
        self.mbd_columns = list(mbd[1]) if mbd else []
        self.mbd_cohorts = mbd_cohorts
        self.calibration = calibration
        self.foundation = foundation
        self.task_names: list[str] = []
        self.task_log_target: list[bool] = []
        self.task_binary: list[bool] = []

    def forward(
        self,
        kjt: KeyedJaggedTensor,
        dense: torch.Tensor,
        cohorts: torch.Tensor,
        fm_keep: torch.Tensor | None = None,
        fm: torch.Tensor | None = None,
    ) -> RankerOutput:
        """Score B pairs.

        Args:
            kjt: keys ``user_id`` (1 per row), ``item_id`` (1 per row), ``history`` (jagged).
            dense: ``[B, F]``; cohorts: ``[B, C]`` bucket ids.
            fm_keep: ``[B]`` bool, which rows get an FM embedding (None: none do).
            fm: precomputed FM embeddings ``[B, D_fm]``; when None and ``fm_keep`` is given,
                the FM runs in this pass (training, synchronous FM).
        """
        b = kjt.stride()
        rows, _ = self.tables(kjt)
        user, item, history = rows["user_id"].values(), rows["item_id"].values(), rows["history"]
        coh = self.cohorts(cohorts)  # [B, C, E_c]
        features = torch.cat([user, item, mean_pool(history, b), dense, coh.flatten(1)], 1)

        fm_logits = None
        present = torch.zeros(b, dtype=torch.bool, device=dense.device) if fm_keep is None else fm_keep
        if self.foundation is not None and fm is None and fm_keep is not None:
            offsets = torch.zeros(b + 1, dtype=torch.int64, device=dense.device)
            offsets[1:] = torch.cumsum(history.lengths().to(torch.int64), 0)
            fm, fm_logits = self.foundation(history.values(), offsets, item, dense)
        if fm is None:
            present = torch.zeros_like(present)
        logits, imputed = self.arch(features, fm, present)  # [B, T], [B, D_fm] | None
        calibrated = logits if self.calibration is None else self.calibration(logits, present)  # [B, T]

        out = RankerOutput({}, {}, fm_logits=fm_logits, fm_present=present)
        if imputed is not None and fm is not None:
            out.fm_imputed, out.fm_embedding = imputed, fm
        for t, name in enumerate(self.task_names):
            z = logits[:, t]
            out.logits[name] = z
            if self.task_binary[t]:
                out.raw_predictions[name] = torch.sigmoid(z)
                out.predictions[name] = torch.sigmoid(calibrated[:, t])
            else:
                out.predictions[name] = torch.expm1(z).clamp(min=0) if self.task_log_target[t] else z
                out.raw_predictions[name] = out.predictions[name]
        if self.mbd is not None:
            if self.mbd_cohorts is not None:
                mbd_in = self.mbd_cohorts(cohorts[:, self.mbd_columns]).flatten(1)  # [B, C_mbd * E_c]
            else:
                mbd_in = coh[:, self.mbd_columns].flatten(1)
            stats = self.mbd(mbd_in)
            out.mbd_mean = {k: v[0] for k, v in stats.items()}
            out.mbd_var = {k: v[1] for k, v in stats.items()}
        return out


# ---------------------------------------------------------------- losses
def task_loss(logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, tasks: list[TaskConfig]) -> torch.Tensor:
    """Weighted sum over tasks of the masked mean loss; ``logits, labels, masks`` ``[B, T]``."""
    total = torch.zeros((), device=logits.device)
    for t, task in enumerate(tasks):
        z, y, m = logits[:, t], labels[:, t], masks[:, t]
        if task.loss == "bce":
            per_row = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        else:
            y = torch.log1p(y.clamp(min=0)) if task.log_target else y
            fn = F.huber_loss if task.loss == "huber" else F.mse_loss
            per_row = fn(z, y, reduction="none")
        total = total + task.weight * (per_row * m).sum() / m.sum().clamp(min=1)
    return total


def ranking_loss(model: RankingModel, out: RankerOutput, labels: torch.Tensor, masks: torch.Tensor, cfg: RankerModelConfig) -> dict[str, torch.Tensor]:
    """The ranker's loss parts: ``tasks``, ``mbd``, ``fm`` and their weighted ``total``."""
    logits = torch.stack([out.logits[t.name] for t in cfg.tasks], 1)  # [B, T]
    parts = {"tasks": task_loss(logits, labels, masks, cfg.tasks)}
    total = parts["tasks"]
    if model.mbd is not None:
        index = {t.name: i for i, t in enumerate(cfg.tasks)}
        stats = {k: (out.mbd_mean[k], out.mbd_var[k]) for k in out.mbd_mean}
        parts["mbd"] = model.mbd.loss(
            stats, {k: labels[:, index[k]] for k in stats}, {k: masks[:, index[k]] for k in stats}
        )
        total = total + cfg.mbd.weight * parts["mbd"]
    if out.fm_logits is not None:
        parts["fm"] = task_loss(out.fm_logits, labels, masks, cfg.tasks)
        total = total + cfg.foundation.weight * parts["fm"]
    if out.fm_imputed is not None and out.fm_embedding is not None:
        parts["fm_impute"] = imputation_loss(out.fm_imputed, out.fm_embedding)
        total = total + cfg.foundation.impute_weight * parts["fm_impute"]
    parts["total"] = total
    return parts


def imputation_loss(imputed: torch.Tensor, fm: torch.Tensor) -> torch.Tensor:
    """Distillation of the FM embedding into the imputer: MSE over the FM's mean square, ``[B,
    D_fm]`` each (1 means "no better than predicting zeros"). Scale-free, so one weight suits any
    FM width or norm, and bounded while the teacher is young (over its *variance* it blew up
    whenever the FM's outputs were nearly constant). The FM gets no gradient from it."""
    target = fm.detach()
    return F.mse_loss(imputed, target) / target.pow(2).mean().clamp(min=1e-6)


def fm_keep_mask(batch_size: int, dropout: float | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time FM dropout: ``[B]`` bool, True where the row keeps its FM embedding."""
    rate = float(torch.rand((), generator=generator)) if dropout == "uniform" else float(dropout)
    return torch.rand(batch_size, generator=generator) >= rate


# ---------------------------------------------------------------- builders
def table_specs(cfg: RankerModelConfig) -> list[TableSpec]:
    """The ranker's id tables: the two-tower's (the same names, features and settings)."""
    return two_tower_table_specs(cfg)


def mbd_scale_of(cfg: RankerModelConfig, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, tuple[float, float]]:
    """Each MBD signal's (mean, std) in model space over the labelled rows of ``labels, masks``
    ``[N, T]`` (task order of ``cfg.tasks``), for :func:`build_ranking_model`."""
    index = {t.name: i for i, t in enumerate(cfg.tasks)}
    return {name: target_scale(labels[:, index[name]], masks[:, index[name]], family)
            for name, family in cfg.mbd.signals.items()}  # fmt: skip


def build_ranking_model(
    cfg: RankerModelConfig, dense_names: list[str], cohort_sizes: dict[str, int], history_len: int, device: torch.device,
    mbd_scale: dict[str, tuple[float, float]] | None = None,
) -> RankingModel:  # fmt: skip
    """A :class:`RankingModel`; tables on ``device`` (use "meta" before DMP), the rest on CPU/``device``.

    ``mbd_scale``: each MBD signal's training-set (mean, std) in model space
    (:func:`mbd_scale_of`); None keeps the identity (a model about to load a state_dict).
    """
    unknown = [c for c in cfg.mbd.cohort if c not in cohort_sizes]
    if unknown:
        raise ValueError(f"model.mbd.cohort: {unknown} are not cohort features; known: {list(cohort_sizes)}")
    tasks = [t.name for t in cfg.tasks]
    missing = [s for s in cfg.mbd.signals if s not in tasks]
    if missing:
        raise ValueError(f"model.mbd.signals: {missing} are not tasks; tasks: {tasks}")
    dense_device = torch.device("cpu") if device.type == "meta" else device
    e, f, c = cfg.embedding_dim, len(dense_names), len(cohort_sizes)
    fm_dim = cfg.foundation.dim if cfg.foundation.enabled else 0
    arch = RankerArch(3 * e + f + c * cfg.cohort_dim, fm_dim, len(tasks), cfg.hidden,
                      cfg.experts if cfg.arch == "mmoe" else 0, impute=cfg.foundation.impute)  # fmt: skip
    mbd, mbd_cohorts = None, None
    if cfg.mbd.signals:
        signals = [MBDSignal(name, family) for name, family in cfg.mbd.signals.items()]
        columns = [list(cohort_sizes).index(name) for name in cfg.mbd.cohort]
        mbd = (MBDBranch(signals, len(columns) * cfg.cohort_dim, cfg.mbd.hidden, cfg.mbd.stop_gradient), columns)
        if mbd_scale is not None:
            mbd[0].set_target_scale(mbd_scale)
        if cfg.mbd.embeddings == "own":
            mbd_cohorts = CohortEmbeddings([cohort_sizes[name] for name in cfg.mbd.cohort], cfg.cohort_dim)
    fm = None
    if cfg.foundation.enabled:
        fc = cfg.foundation
        fm = FoundationModel(FoundationArchSpec(e, f, history_len, len(tasks), fc.dim, fc.layers, fc.heads))
    model = RankingModel(
        build_tables(table_specs(cfg), device), CohortEmbeddings(list(cohort_sizes.values()), cfg.cohort_dim), arch, mbd, fm,
        mbd_cohorts, PathCalibration(len(tasks)),
    )
    model.task_names = tasks
    model.task_log_target = [t.log_target for t in cfg.tasks]
    model.task_binary = [t.loss == "bce" for t in cfg.tasks]
    for name, module in model.named_children():
        if name != "tables":
            module.to(dense_device)
    return model


# ---------------------------------------------------------------- batch scoring
def example_batches(table: pa.Table, batch_size: int):
    """Fixed-size slices of an example table (the last may be short)."""
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)


def model_inputs(batch: pa.Table, num_dense: int, num_cohorts: int, num_tasks: int, device: torch.device) -> dict:
    """Arrow example batch → the forward's tensors plus labels/masks ``[B, T]``."""
    arrays = batch_arrays(batch, num_dense, num_cohorts, num_tasks)
    return {
        "kjt": to_kjt(batch.select(list(FEATURES)), FEATURES).to(device),
        **{k: torch.from_numpy(v).to(device) for k, v in arrays.items()},
    }


@torch.no_grad()
def score_table(
    model: nn.Module, table: pa.Table, shape: tuple[int, int, int], batch_size: int, fm_hit_rate: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Predictions for every row of an example table (eval mode; collective under DMP).

    ``fm_hit_rate`` is the share of rows whose FM embedding is available (computed in the same
    pass, i.e. the FM "cache" holds it); 0 is no FM, 1 the oracle. Returns ``pred/<task>``,
    ``raw_pred/<task>`` (before calibration), ``mbd_mean/<signal>``, ``mbd_var/<signal>``
    arrays ``[N]``.
    """
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {}
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    for batch in example_batches(table, batch_size):
        inputs = model_inputs(batch, *shape, device)
        keep = torch.rand(batch.num_rows, generator=generator) < fm_hit_rate
        out = model(inputs["kjt"], inputs["dense"], inputs["cohorts"], fm_keep=keep.to(device))
        for prefix, values in (("pred", out.predictions), ("raw_pred", out.raw_predictions),
                               ("mbd_mean", out.mbd_mean), ("mbd_var", out.mbd_var)):  # fmt: skip
            for name, v in values.items():
                parts.setdefault(f"{prefix}/{name}", []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------- serving artifact
RANKER_JSON = "ranker.json"
MODEL_FILE = "model.pt"


def export_ranker(
    state_dict: dict[str, torch.Tensor], directory: Path, cfg: RankerModelConfig, value: ValueConfig,
    features: FeatureTables, tasks: dict[str, str], histories: pa.Table, history_len: int, version: str,
) -> None:  # fmt: skip
    """Write the serving artifact (format in the module docstring) from an unsharded state_dict."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / MODEL_FILE)
    features.write(directory)
    pq.write_table(histories, directory / "histories.parquet")
    meta = {
        "model": cfg.model_dump(mode="json"),
        "value": value.model_dump(mode="json"),
        "dense_names": features.dense_names,
        "cohort_sizes": features.cohort_sizes,
        "tasks": tasks,
        "history_len": history_len,
        "version": version,
    }
    (directory / RANKER_JSON).write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class RankerScorer:
    """An unsharded ranker loaded from its artifact: ``score(users, candidates, fm)``.

    Args:
        model: the :class:`RankingModel` in eval mode (MPZCH lookups read-only).
        features: user/item feature tables; histories: user_id → history.
        meta: the parsed ``ranker.json``.
    """

    model: RankingModel
    features: FeatureTables
    histories: pa.Table
    meta: dict

    def inputs(self, user_ids: int | np.ndarray, candidates: np.ndarray) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
        """The forward's inputs for N (user, candidate) pairs: KJT, dense ``[N, F]``, cohorts ``[N, C]``.

        ``user_ids``: ``[N]``, or one id for every candidate.
        """
        candidates = np.asarray(candidates, dtype=np.int64)
        users = np.broadcast_to(np.asarray(user_ids, dtype=np.int64), candidates.shape).copy()
        history = histories_of(self.histories, users)
        batch = pa.table({"user_id": pa.array(users), "item_id": pa.array(candidates), "history": history})
        dense, cohorts = self.features.assemble(users, candidates)
        return to_kjt(batch, FEATURES), torch.from_numpy(dense), torch.from_numpy(cohorts)

    @torch.no_grad()
    def score(
        self, user_ids: int | np.ndarray, candidates: np.ndarray, fm: torch.Tensor | None = None,
        fm_present: torch.Tensor | None = None,
    ) -> RankerOutput:  # fmt: skip
        """Per-task predictions and MBD stats for N pairs: ``candidates`` ``[N]`` and
        ``user_ids`` ``[N]`` (or one user for all). Pairs of many users score in one forward
        pass: rows do not interact, so the serving ranker scores a whole request batch at once.

        ``fm`` ``[N, D_fm]`` precomputed FM embeddings (rows where ``fm_present`` ``[N]`` is
        False are ignored) or None: every row uses the learned missing embedding.
        """
        kjt, dense, cohorts = self.inputs(user_ids, candidates)
        n = len(candidates)
        if fm is None:
            return self.model(kjt, dense, cohorts)
        present = torch.ones(n, dtype=torch.bool) if fm_present is None else fm_present
        return self.model(kjt, dense, cohorts, fm_keep=present, fm=fm)

    @torch.no_grad()
    def fm_embeddings(self, user_ids: int | np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        """The FM's user–item embeddings ``[N, D_fm]`` for N pairs (what serving precomputes)."""
        if self.model.foundation is None:
            raise ValueError("this ranker was trained without a foundation model")
        kjt, dense, _ = self.inputs(user_ids, candidates)
        rows, _ = self.model.tables(kjt)
        history = rows["history"]
        offsets = torch.zeros(len(candidates) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(history.lengths().to(torch.int64), 0)
        return self.model.foundation(history.values(), offsets, rows["item_id"].values(), dense)[0]


def load_ranker(directory: Path) -> RankerScorer:
    """Load the artifact written by :func:`export_ranker` into an unsharded model on CPU."""
    directory = Path(directory)
    meta = json.loads((directory / RANKER_JSON).read_text())
    if meta["model"].get("mbd", {}).get("signals"):
        # artifacts written before MBD had cohort tables of its own read the ranker's
        meta["model"]["mbd"].setdefault("embeddings", "shared")
    cfg = RankerModelConfig.model_validate(meta["model"])
    model = build_ranking_model(cfg, meta["dense_names"], meta["cohort_sizes"], meta["history_len"], torch.device("cpu"))
    state = torch.load(directory / MODEL_FILE, weights_only=True)
    for name, value in model.state_dict().items():
        if name.startswith(("calibration.", "mbd.target_")):  # older artifacts: identity maps
            state.setdefault(name, value)
    model.load_state_dict(state)
    model.eval()
    set_mpzch_training(model, False)
    features = FeatureTables.read(directory, meta["dense_names"], meta["cohort_sizes"])
    return RankerScorer(model, features, pq.read_table(directory / "histories.parquet"), meta)
