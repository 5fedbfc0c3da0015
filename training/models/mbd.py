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

Gradient isolation: the heads read the ranker's shared cohort embeddings; with
``stop_gradient`` (the default) those are detached, so MBD's loss does not reshape the trunk
the main tasks share (the ablation turns it off).

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

    def forward(self, cohort: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``cohort`` ``[B, in_dim]`` → {signal: (mean ``[B]``, var ``[B]``)} in model space."""
        if self.stop_gradient:
            cohort = cohort.detach()
        out = {}
        for s in self.signals:
            mean, raw_var = self.heads[s.name](cohort).unbind(dim=1)  # [B], [B]
            out[s.name] = (mean, F.softplus(raw_var) + MIN_VAR)
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


def _head(in_dim: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 2))  # mean, pre-softplus variance
    return nn.Sequential(*layers)
