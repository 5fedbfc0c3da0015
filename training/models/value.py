"""The value model: one ranking score from the ranker's calibrated signals, by config only.

``score = Σ_k w_k · f_k(signal_k)`` with ``f_k`` one of

* ``raw``: the prediction itself (probability, or regression output in natural units);
* ``z``: its MBD cohort z-score ``(g(ŷ) - μ_c) / σ_c`` (:func:`training.models.mbd.standardize`);
* ``pct``: the cohort percentile ``Φ(z)`` (bounded in (0, 1), so one heavy-tailed signal cannot
  dominate the sum).

The cohort statistics ``z`` / ``pct`` read are ``out.mbd_mean`` / ``out.mbd_var``: MBD's, or a
fitted per-cohort normaliser's (:mod:`training.models.cohort_norm`, whose ``apply`` fills them
in), so the value model scores either without a change.

Why a separate, parameter-free function: product owners change weights often; a weight or
transform change must take effect without retraining or re-exporting the ranker. The ranker's
outputs (:class:`training.models.ranker.RankerOutput`) hold everything this needs.

Notation: B candidates.

Example::

    value = ValueModel.from_config(ValueConfig(terms=[
        ValueTerm(signal="watch_time", weight=1.0, transform="pct"),
        ValueTerm(signal="loop", weight=0.5, transform="pct"),
    ]), families={"watch_time": "lognormal", "loop": "gaussian"})
    scores = value(out)                    # [B]
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.models.mbd import Family, standardize

Transform = Literal["raw", "z", "pct"]


class ValueTerm(BaseModel):
    """One term of the value sum: ``weight · transform(signal)``."""

    model_config = ConfigDict(extra="forbid")
    signal: str
    weight: float = 1.0
    transform: Transform = "raw"


class ValueConfig(BaseModel):
    """The value model's config (the ``value`` section of a ranker config, or a serving override)."""

    model_config = ConfigDict(extra="forbid")
    terms: list[ValueTerm] = Field(default_factory=list)


def apply_transform(
    pred: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None, transform: Transform, family: Family
) -> torch.Tensor:
    """``f(pred)`` for one signal; ``[B]`` → ``[B]``. z/pct need MBD stats for the signal."""
    if transform == "raw":
        return pred
    if mean is None or var is None:
        raise ValueError(f"transform {transform!r} needs MBD statistics for this signal")
    z = standardize(pred, mean, var, family)
    return z if transform == "z" else torch.special.ndtr(z)


def check_value_config(cfg: ValueConfig, signals: Collection[str], families: Mapping[str, Family]) -> None:
    """Raise ValueError, naming every bad term, unless ``cfg`` can score a ranker's outputs.

    ``signals``: the ranker's tasks (keys of ``RankerOutput.predictions``); ``families``: the
    signals MBD debiases (only they have the cohort statistics ``z`` and ``pct`` read). Why
    check ahead: :meth:`ValueModel.__call__` finds the same problems only while scoring, so a
    bad config accepted by a live server fails every request instead of being refused once.
    """
    problems = []
    for t in cfg.terms:
        if t.signal not in signals:
            problems.append(f"{t.signal!r} is not a ranker task (tasks: {sorted(signals)})")
        elif t.transform != "raw" and t.signal not in families:
            problems.append(f"{t.signal!r} has no MBD statistics for transform {t.transform!r} "
                            f"(debiased signals: {sorted(families)}, or transform 'raw')")  # fmt: skip
    if not cfg.terms:
        problems.append("no terms")
    if problems:
        raise ValueError("value config: " + "; ".join(problems))


@dataclass
class ValueModel:
    """A config-only scorer over ranker outputs.

    Args:
        terms: the weighted terms.
        families: MBD family of each debiased signal (how its z-score is taken).
    """

    terms: list[ValueTerm]
    families: Mapping[str, Family]

    @classmethod
    def from_config(cls, cfg: ValueConfig, families: Mapping[str, Family]) -> ValueModel:
        return cls(list(cfg.terms), dict(families))

    def reweighted(self, weights: Mapping[str, float]) -> ValueModel:
        """The same transforms with new weights (signal → weight); no model involved."""
        terms = [t.model_copy(update={"weight": weights.get(t.signal, t.weight)}) for t in self.terms]
        return ValueModel(terms, self.families)

    def with_transform(self, transform: Transform) -> ValueModel:
        """Every term with one transform (raw falls back for signals MBD does not debias)."""
        terms = [
            t.model_copy(update={"transform": transform if t.signal in self.families else "raw"}) for t in self.terms
        ]
        return ValueModel(terms, self.families)

    def __call__(self, out) -> torch.Tensor:
        """``out``: a RankerOutput (predictions / mbd_mean / mbd_var dicts of ``[B]``) → ``[B]``.

        ``raw`` terms read the (calibrated) prediction; ``z`` / ``pct`` terms standardise the
        prediction before calibration (``raw_predictions`` when ``out`` has them), the space
        MBD's cohort statistics were fitted in.
        """
        score = None
        uncalibrated = getattr(out, "raw_predictions", None) or {}
        for t in self.terms:
            if t.signal not in out.predictions:
                raise KeyError(f"value term {t.signal!r} is not a ranker task; tasks: {sorted(out.predictions)}")
            pred = out.predictions[t.signal] if t.transform == "raw" else uncalibrated.get(t.signal, out.predictions[t.signal])
            f = apply_transform(
                pred,
                out.mbd_mean.get(t.signal),
                out.mbd_var.get(t.signal),
                t.transform,
                self.families.get(t.signal, "gaussian"),
            )
            score = t.weight * f if score is None else score + t.weight * f
        if score is None:
            raise ValueError("the value model has no terms")
        return score
