"""Per-cohort normalisers fitted on a training log: the baselines MBD has to beat.

Why: MBD (:mod:`training.models.mbd`) learns each debiased signal's cohort mean and variance with
a network. A user without MBD would normalise with statistics counted from the log instead: one
global mean/std (``global_z``), each cohort's empirical mean/std (``groupby_z``), or each
cohort's empirical quantiles (``quantile``). These are those, fitted once, with MBD's interface
at the value model: :meth:`apply` returns the ranker's output with ``mbd_mean`` / ``mbd_var``
replaced, so :class:`training.models.value.ValueModel` scores it unchanged (``z`` or ``pct``).

Why not a library: scikit-learn's ``StandardScaler`` / ``QuantileTransformer`` fit one
distribution per column, not one per group; pandas' groupby counts the per-cell statistics but
leaves the lookup for unseen cells (with back-off), the family's space and the torch tensors the
value model reads to the caller. That lookup is most of this file; the counting is numpy
(``np.bincount`` over cell ids).

Cohorts: ``[N, C]`` int64 bucket ids (the columns of the partial feature set). A cell is one
distinct row of them. Cells seen fewer than ``min_count`` times in the log (or not at all) back
off to the global statistics: a cell of 1 row has no variance, and an unseen cohort (a new
length bucket, a category added after fitting) must still score.

Statistics live in the family's model space (y, or log1p(y) for ``lognormal``), as MBD's do.

Quantiles: a prediction's percentile within its cell is the mid-rank
``p = (#below + #equal / 2 + 1/2) / (n + 1)`` ∈ (0, 1) among the fitted values; :meth:`apply`
hands it on as the normal score ``z = Φ⁻¹(p)`` (mean ``g(ŷ) - z``, variance 1, so the value
model's ``pct`` gives back ``p`` exactly). Fit it on the *predictions* of the training rows: the
labels of a binary signal take two values, and every prediction in (0, 1) would get the same
percentile within a cell.

Notation: N rows, C cohort columns, B scored rows.

Example::

    norm = CohortGroupbyNorm.fit(cohorts, {"loop": labels}, {"loop": masks}, {"loop": "gaussian"})
    out = norm.apply(ranker_output, torch.from_numpy(test_cohorts))      # mbd_mean/var replaced
    value = ValueModel.from_config(cfg, families).with_transform("z")(out)  # [B]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from training.models.mbd import MIN_VAR, Family, to_model_space
from training.models.ranker import RankerOutput

Arrays = Mapping[str, np.ndarray]


class CohortNormConfig(BaseModel):
    """Which normaliser, and when a cell is too small to trust.

    Args:
        kind: ``global_z``, ``groupby_z`` or ``quantile``.
        min_count: cells with fewer fitted rows back off to the global statistics.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["global_z", "groupby_z", "quantile"]
    min_count: int = Field(10, ge=1)


class Normaliser(Protocol):
    """What the value model needs: the ranker's output with cohort statistics filled in."""

    def apply(self, out: RankerOutput, cohorts: torch.Tensor) -> RankerOutput: ...


def _model_space(values: np.ndarray, family: Family) -> np.ndarray:
    return to_model_space(torch.from_numpy(np.asarray(values, np.float64)), family).numpy()


@dataclass
class CellIndex:
    """Distinct cohort rows seen at fit, each with an id; unseen rows map to -1.

    Args:
        radix: per column, one more than the largest bucket seen (the mixed-radix base).
        keys: sorted encoded keys of the cells ``[K]``.
    """

    radix: np.ndarray
    keys: np.ndarray

    @classmethod
    def fit(cls, cohorts: np.ndarray) -> tuple[CellIndex, np.ndarray]:
        """The index and each fitted row's cell id ``[N]``."""
        cohorts = np.asarray(cohorts, np.int64).reshape(len(cohorts), -1)  # [N, C]
        radix = cohorts.max(axis=0) + 1 if len(cohorts) else np.ones(cohorts.shape[1], np.int64)
        if np.prod(radix.astype(np.float64)) >= 2**62:
            raise ValueError(f"cohort columns with {radix.tolist()} buckets do not fit one int64 key")
        keys, cell = np.unique(cls._encode(cohorts, radix), return_inverse=True)
        return cls(radix, keys), cell.reshape(-1)

    @staticmethod
    def _encode(cohorts: np.ndarray, radix: np.ndarray) -> np.ndarray:
        return np.ravel_multi_index(tuple(cohorts.T), tuple(int(r) for r in radix)) if cohorts.shape[1] else np.zeros(len(cohorts), np.int64)

    def lookup(self, cohorts: np.ndarray) -> np.ndarray:
        """Cell id of each row ``[B]`` (-1: a bucket or a combination never seen at fit)."""
        cohorts = np.asarray(cohorts, np.int64).reshape(len(cohorts), -1)
        inside = ((cohorts >= 0) & (cohorts < self.radix)).all(axis=1)
        key = self._encode(np.where(inside[:, None], cohorts, 0), self.radix)
        pos = np.searchsorted(self.keys, key).clip(max=max(len(self.keys) - 1, 0))
        found = inside & (len(self.keys) > 0) & (self.keys[pos] == key)
        return np.where(found, pos, -1)


def _with_stats(out: RankerOutput, mean: dict[str, torch.Tensor], var: dict[str, torch.Tensor]) -> RankerOutput:
    return dataclasses.replace(out, mbd_mean=mean, mbd_var=var)


def _pred(out: RankerOutput, signal: str) -> torch.Tensor:
    """The prediction MBD standardises: before calibration, as the value model reads it."""
    return (out.raw_predictions or {}).get(signal, out.predictions[signal])


@dataclass
class GlobalNorm:
    """One (mean, var) per signal over the whole log: z = (g(ŷ) - μ) / σ.

    Args:
        stats: signal → (mean, var) in model space.
        families: signal → family.
    """

    stats: dict[str, tuple[float, float]]
    families: dict[str, Family]

    @classmethod
    def fit(cls, values: Arrays, masks: Arrays, families: Mapping[str, Family]) -> GlobalNorm:
        stats = {}
        for s, family in families.items():
            y = _model_space(values[s][np.asarray(masks[s]) > 0], family)
            stats[s] = (float(y.mean()), max(float(y.var()), MIN_VAR)) if len(y) else (0.0, 1.0)
        return cls(stats, dict(families))

    def apply(self, out: RankerOutput, cohorts: torch.Tensor) -> RankerOutput:
        n = len(cohorts)
        mean = {s: torch.full((n,), m, dtype=torch.float64) for s, (m, _) in self.stats.items()}
        var = {s: torch.full((n,), v, dtype=torch.float64) for s, (_, v) in self.stats.items()}
        return _with_stats(out, mean, var)


@dataclass
class CohortGroupbyNorm:
    """Each cell's empirical (mean, var) from the log; small or unseen cells use the global ones.

    Args:
        cells: the fitted cells.
        mean / var: signal → per-cell statistics ``[K]`` in model space (back-off already
            applied to cells under ``min_count``).
        fallback: the global statistics, for cells not in ``cells``.
        families: signal → family.
    """

    cells: CellIndex
    mean: dict[str, np.ndarray]
    var: dict[str, np.ndarray]
    fallback: GlobalNorm
    families: dict[str, Family]

    @classmethod
    def fit(cls, cohorts: np.ndarray, values: Arrays, masks: Arrays, families: Mapping[str, Family], min_count: int = 10) -> CohortGroupbyNorm:
        cells, cell = CellIndex.fit(cohorts)
        fallback = GlobalNorm.fit(values, masks, families)
        k = len(cells.keys)
        mean, var = {}, {}
        for s, family in families.items():
            w = (np.asarray(masks[s]) > 0).astype(np.float64)  # [N]
            y = np.where(w > 0, _model_space(values[s], family), 0.0)
            n = np.bincount(cell, w, k)
            mu = np.bincount(cell, w * y, k) / np.maximum(n, 1)
            v = np.bincount(cell, w * (y - mu[cell]) ** 2, k) / np.maximum(n, 1)  # population variance
            trusted = n >= min_count
            g_mean, g_var = fallback.stats[s]
            mean[s] = np.where(trusted, mu, g_mean)
            var[s] = np.where(trusted, np.maximum(v, MIN_VAR), g_var)
        return cls(cells, mean, var, fallback, dict(families))

    def cohort_stats(self, cohorts: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """signal → (mean ``[B]``, var ``[B]``) of each row's cell (global where unseen)."""
        cell = self.cells.lookup(cohorts.cpu().numpy())
        out = {}
        for s in self.families:
            g_mean, g_var = self.fallback.stats[s]
            mean = np.where(cell >= 0, self.mean[s][cell.clip(min=0)], g_mean) if len(self.cells.keys) else np.full(len(cell), g_mean)
            var = np.where(cell >= 0, self.var[s][cell.clip(min=0)], g_var) if len(self.cells.keys) else np.full(len(cell), g_var)
            out[s] = (torch.from_numpy(mean), torch.from_numpy(var))
        return out

    def apply(self, out: RankerOutput, cohorts: torch.Tensor) -> RankerOutput:
        stats = self.cohort_stats(cohorts)
        return _with_stats(out, {s: m for s, (m, _) in stats.items()}, {s: v for s, (_, v) in stats.items()})


@dataclass
class CohortQuantileNorm:
    """Each cell's empirical distribution (sorted values); small or unseen cells use the whole log's.

    Args:
        cells: the fitted cells.
        sorted_values: signal → per cell its sorted fitted values (model space); ``None`` for a
            cell under ``min_count`` (it backs off).
        pooled: signal → all fitted values, sorted (the back-off distribution).
        families: signal → family.
    """

    cells: CellIndex
    sorted_values: dict[str, list[np.ndarray | None]]
    pooled: dict[str, np.ndarray]
    families: dict[str, Family]

    @classmethod
    def fit(cls, cohorts: np.ndarray, values: Arrays, masks: Arrays, families: Mapping[str, Family], min_count: int = 10) -> CohortQuantileNorm:
        cells, cell = CellIndex.fit(cohorts)
        per_cell, pooled = {}, {}
        for s, family in families.items():
            keep = np.asarray(masks[s]) > 0
            y, c = _model_space(values[s][keep], family), cell[keep]
            order = np.lexsort((y, c))  # by cell, then value
            y, c = y[order], c[order]
            bounds = np.searchsorted(c, np.arange(len(cells.keys) + 1))  # [K + 1]
            per_cell[s] = [y[a:b] if b - a >= min_count else None for a, b in zip(bounds[:-1], bounds[1:])]
            pooled[s] = np.sort(y)
        return cls(cells, per_cell, pooled, dict(families))

    def _distribution(self, s: str, cell: int) -> np.ndarray:
        values = self.sorted_values[s][cell] if cell >= 0 else None
        return self.pooled[s] if values is None else values

    def percentile(self, pred: Mapping[str, torch.Tensor], cohorts: torch.Tensor) -> dict[str, torch.Tensor]:
        """signal → mid-rank percentile ``[B]`` ∈ (0, 1) of each prediction within its cell."""
        cell = self.cells.lookup(cohorts.cpu().numpy())
        out = {}
        for s, family in self.families.items():
            x = _model_space(pred[s].detach().cpu().numpy(), family)
            p = np.empty(len(x))
            for c in np.unique(cell):
                rows = cell == c
                dist = self._distribution(s, int(c))
                below = np.searchsorted(dist, x[rows], side="left")
                equal = np.searchsorted(dist, x[rows], side="right") - below
                p[rows] = (below + 0.5 * equal + 0.5) / (len(dist) + 1)
            out[s] = torch.from_numpy(p)
        return out

    def cohort_means(self, cohorts: torch.Tensor) -> dict[str, torch.Tensor]:
        """signal → mean of each row's cell distribution ``[B]`` (a location, for calibration)."""
        cell = self.cells.lookup(cohorts.cpu().numpy())
        means = {s: {int(c): float(self._distribution(s, int(c)).mean()) for c in np.unique(cell)} for s in self.families}
        return {s: torch.tensor([m[int(c)] for c in cell], dtype=torch.float64) for s, m in means.items()}

    def apply(self, out: RankerOutput, cohorts: torch.Tensor) -> RankerOutput:
        preds = {s: _pred(out, s) for s in self.families}
        pct = self.percentile(preds, cohorts)
        mean, var = {}, {}
        for s, family in self.families.items():
            z = torch.special.ndtri(pct[s])  # [B] normal score of the percentile
            mean[s] = to_model_space(preds[s].double(), family) - z
            var[s] = torch.ones_like(z)
        return _with_stats(out, mean, var)


def fit_normaliser(cfg: CohortNormConfig, cohorts: np.ndarray, values: Arrays, masks: Arrays,
                   families: Mapping[str, Family]) -> Normaliser:  # fmt: skip
    """Build the configured normaliser from a log: ``cohorts`` ``[N, C]``, ``values`` / ``masks``
    signal → ``[N]`` (labels for the z-scores, the model's predictions of the rows for quantiles)."""
    if cfg.kind == "global_z":
        return GlobalNorm.fit(values, masks, families)
    if cfg.kind == "groupby_z":
        return CohortGroupbyNorm.fit(cohorts, values, masks, families, cfg.min_count)
    return CohortQuantileNorm.fit(cohorts, values, masks, families, cfg.min_count)
