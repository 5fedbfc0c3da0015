"""The multi-task ranker (MTML) with its MBD branch and the foundation-model input: modules and builder.

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
   embeddings by default, see :class:`training.models.ranker_config.MBDConfig`) → (μ, σ²) per
   debiased signal.

Tasks: ``binary`` (BCE on logits, prediction = sigmoid) or ``regression`` (MSE or Huber,
optionally on log1p of the target, prediction back in natural units).

The rest of the ranker lives beside this file, one job each: its config
(:mod:`training.models.ranker_config`), losses (:mod:`training.models.ranker_loss`), scoring of
example tables (:mod:`training.models.ranker_scoring`) and the serving artifact
(:mod:`training.models.ranker_artifact`, the only one serving imports).

Notation: B pairs, E id-table dim, F dense features, C cohort features, T tasks, S debiased
signals, D_fm FM width.

Example::

    model = build_ranking_model(cfg.model, dense_names, cohort_sizes, history_len, device=torch.device("cpu"))
    out = model(kjt, dense, cohorts, fm_keep=torch.ones(B, dtype=torch.bool))
    out.predictions["like"], out.mbd_mean["watch_time"], out.mbd_var["watch_time"]   # [B] each
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import TableSpec, build_tables
from training.models.calibration import PathCalibration
from training.models.foundation import FoundationArchSpec, FoundationModel
from training.models.mbd import MBDBranch, MBDSignal, target_scale
from training.models.ranker_config import RankerModelConfig
from training.models.two_tower import mean_pool, mlp
from training.models.two_tower import table_specs as two_tower_table_specs


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


# ---------------------------------------------------------------- builder
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
