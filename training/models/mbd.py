"""MBD, model-based debiasing: the distribution of each engagement signal within a cohort.

Why: a raw prediction mixes what the user likes with who the user is and what the item is
(long videos collect more watch time whatever their quality). MBD predicts, from a *partial*
feature set only (the cohort: e.g. item length bucket, user activity level), the mean μ and
variance σ² of each debiased signal. A prediction ŷ then becomes a z-score
``z = (g(ŷ) - μ) / σ`` or a percentile ``Φ(z)`` *within its cohort*
(:mod:`training.models.value`). The partial feature set is config: it is the user's definition
of "unbiased".

Families (per signal):

* ``gaussian``: y ~ N(μ, σ²), trained with Gaussian NLL, g = identity.
* ``lognormal``: log(1 + y) ~ N(μ, σ²) for heavy-tailed non-negative signals (watch time),
  trained with Gaussian NLL on log1p(y), g = log1p.

Scale: each head predicts in standardized units of its signal. The signal's training-set mean
and std (model space; :func:`target_scale`) are buffers set once when the model is built, so a
head starts at the global distribution and only learns O(1) cohort offsets. Why: without them,
the mean head of log1p(watch time) ≈ 4 had to move its output by 4 at the trunk's learning rate;
after the ~300 steps of ``make bench-ranking`` it had not, the under-fit cohort means trailed the
cohort's length, and a quarter of the planted length bias survived debiasing.

Gradient isolation: in the ranker the heads read cohort embeddings of their own by default
(``model.mbd.embeddings: own``), so MBD's loss cannot reshape the trunk the main tasks share.
With ``shared`` they read the ranker's cohort embeddings, detached when ``stop_gradient`` (the
default; off is the ablation).

Notation: B rows, C cohort features, E_c cohort embedding dim, S debiased signals.

Example::

    mbd = MBDBranch([MBDSignal("watch_time", "lognormal")], in_dim=2 * 8, hidden=[32])
    stats = mbd(cohort_emb)                       # {"watch_time": (mean [B], var [B])}
    loss = mbd.loss(stats, {"watch_time": y}, {"watch_time": mask})
    z = standardize(pred, *stats["watch_time"], family="lognormal")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Family = Literal["gaussian", "lognormal"]

# Variance floor: keeps z finite for a cohort whose signal is (nearly) constant.
MIN_VAR = 1e-4


@dataclass
class MBDSignal:
    """One debiased signal.

    Args:
        name: the task whose prediction is debiased (a ranker task name).
        family: "gaussian" or "lognormal" (heavy-tailed, non-negative signals).
    """

    name: str
    family: Family = "gaussian"


def to_model_space(y: torch.Tensor, family: Family) -> torch.Tensor:
    """The space the family's Gaussian lives in: y, or log1p(y) for lognormal."""
    return torch.log1p(y.clamp(min=0)) if family == "lognormal" else y


def standardize(pred: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, family: Family) -> torch.Tensor:
    """Cohort z-score of a prediction ``[B]`` given the cohort's mean/var ``[B]``."""
    return (to_model_space(pred, family) - mean) / var.clamp(min=MIN_VAR).sqrt()


class MBDBranch(nn.Module):
    """Per-signal heads predicting (mean, variance) from the cohort features.

    Args:
        signals: the debiased signals, one head each.
        in_dim: width of the cohort feature vector (concatenated cohort embeddings).
        hidden: hidden widths of each head's MLP.
        stop_gradient: detach the input so MBD's loss does not train the shared embeddings.
    """

    def __init__(self, signals: list[MBDSignal], in_dim: int, hidden: list[int], stop_gradient: bool = True) -> None:
        super().__init__()
        self.signals = list(signals)
        self.stop_gradient = stop_gradient
        self.heads = nn.ModuleDict({s.name: _head(in_dim, hidden) for s in signals})
        # [S] each: the signals' global mean and std in model space (identity until set); saved
        # with the weights, so a checkpoint or serving artifact carries them.
        self.register_buffer("target_loc", torch.zeros(len(self.signals)))
        self.register_buffer("target_scale", torch.ones(len(self.signals)))

    def set_target_scale(self, scale: dict[str, tuple[float, float]]) -> None:
        """Set each signal's (mean, std) in model space, e.g. from :func:`target_scale`."""
        for i, s in enumerate(self.signals):
            loc, std = scale[s.name]
            self.target_loc[i] = float(loc)
            self.target_scale[i] = max(float(std), MIN_VAR**0.5)

    def forward(self, cohort: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``cohort`` ``[B, in_dim]`` → {signal: (mean ``[B]``, var ``[B]``)} in model space."""
        if self.stop_gradient:
            cohort = cohort.detach()
        out = {}
        for i, s in enumerate(self.signals):
            mean, raw_var = self.heads[s.name](cohort).unbind(dim=1)  # [B], [B] standardized
            loc, scale = self.target_loc[i], self.target_scale[i]
            out[s.name] = (loc + scale * mean, scale**2 * F.softplus(raw_var) + MIN_VAR)
        return out

    def loss(
        self,
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
        targets: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Mean Gaussian NLL over signals (masked rows ignored); targets in natural units."""
        total = torch.zeros((), device=next(iter(stats.values()))[0].device)
        for s in self.signals:
            mean, var = stats[s.name]
            y = to_model_space(targets[s.name], s.family)
            nll = F.gaussian_nll_loss(mean, y, var, reduction="none", full=False)  # [B]
            m = masks[s.name]
            total = total + (nll * m).sum() / m.sum().clamp(min=1)
        return total / max(len(self.signals), 1)


def target_scale(labels: torch.Tensor, masks: torch.Tensor, family: Family) -> tuple[float, float]:
    """(mean, std) of one signal's labelled rows in model space: ``labels, masks`` ``[N]``."""
    y = to_model_space(labels[masks > 0].double(), family)
    if y.numel() < 2:
        return 0.0, 1.0
    return float(y.mean()), float(y.std())


def _head(in_dim: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 2))  # mean, pre-softplus variance
    return nn.Sequential(*layers)
