"""What the ranker stage needs from training, as two small interfaces, and how a run provides them.

Serving depends on two callables, not on a model class, so the ranker and the FM can change
inside ``training/models/`` without touching the deployments:

- :class:`CandidateScorer`: ``score(user_ids [N], candidates [N], fm [N, D] | None, fm_present [N])``
  over N (user, candidate) pairs, possibly of many users (one request batch) → an object with
  ``predictions`` / ``mbd_mean`` / ``mbd_var`` dicts of ``[N]`` tensors
  (``training.models.ranker.RankerOutput``); rows with ``fm_present`` False take the ranker's
  learned *missing* path.
- :class:`FMScorer`: ``(user_ids [N], item_ids [N]) → [N, D]`` float32, with a ``version`` and
  ``dim``; what the precompute workers run off the request path (and the request path runs in
  "sync" mode).

A *models factory* is an import path ``"module:function"`` taking the run folder and returning
:class:`RankingModels` or None (retrieval-only). The default, :func:`load_run_models`, reads the
run's ``ranker/`` artifact with ``training.models.ranker_artifact.load_ranker``; tests pass a factory of
their own. Import paths (not objects) cross to the replicas, so every replica loads its own copy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from training.models.value import ValueConfig
from training import storage

DEFAULT_MODELS_FACTORY = "serving.ranking_models:load_run_models"
RANKER_DIR = "ranker"  # runs/<id>/ranker/, written by training.models.ranker_artifact.export_ranker


class CandidateScorer(Protocol):
    def score(
        self, user_ids: np.ndarray, candidates: np.ndarray, fm: torch.Tensor | None = None, fm_present: torch.Tensor | None = None
    ) -> Any: ...


class FMScorer(Protocol):
    version: str
    dim: int

    def __call__(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class RankingModels:
    """Everything the ranker stage loads from a run.

    Args:
        scorer: the multi-task ranker.
        fm: the foundation model, or None when the ranker was trained without one.
        value: the value model's config as trained (serving may override it live).
        signals: the scorer's task names (keys of its ``predictions``): what a value config
            may weight (``training.models.value.check_value_config``).
        families: MBD family per debiased signal (how ``z``/``pct`` transforms standardise).
        version: the ranker's version string, reported by /readyz and /recommend.
    """

    scorer: CandidateScorer
    fm: FMScorer | None
    value: ValueConfig
    signals: tuple[str, ...]
    families: Mapping[str, str] = field(default_factory=dict)
    version: str = ""


ModelsFactory = Callable[[str], "RankingModels | None"]


def resolve_factory(path: str) -> ModelsFactory:
    """``"pkg.module:function"`` → the function."""
    module, _, name = path.partition(":")
    if not name:
        raise ValueError(f"models factory must look like 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


def run_has_ranker(run_dir: str | Path) -> bool:
    return storage.exists(storage.join(str(run_dir), RANKER_DIR, "ranker.json"))


class _RankerFM:
    """Adapts ``RankerScorer.fm_embeddings(users, candidates)`` to the :class:`FMScorer` call:
    every pair of the batch, whatever its user, in one forward pass."""

    def __init__(self, ranker: Any, version: str, dim: int) -> None:
        self._ranker, self.version, self.dim = ranker, version, dim

    @torch.no_grad()
    def __call__(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        if len(user_ids) == 0:
            return torch.empty(0, self.dim)
        return self._ranker.fm_embeddings(user_ids.numpy(), item_ids.numpy())


def load_run_models(run_dir: str) -> RankingModels | None:
    """The run's ranker (and FM) from ``<run>/ranker/``, or None for a retrieval-only run."""
    if not run_has_ranker(run_dir):
        return None
    from training.models.ranker_artifact import (
        load_ranker,  # heavy (torchrec): only when there is one
    )

    ranker = load_ranker(storage.local_path(storage.join(run_dir, RANKER_DIR)))  # a URI: this node's copy
    meta = ranker.meta
    version = str(meta.get("version", ""))
    fm = None
    if getattr(ranker.model, "foundation", None) is not None:
        fm = _RankerFM(ranker, version=f"{version}/fm", dim=ranker.model.foundation.spec.dim)
    families = dict(meta["model"].get("mbd", {}).get("signals", {}))  # signal → family
    value = ValueConfig.model_validate(meta.get("value", {}))
    return RankingModels(ranker, fm, value, tuple(meta["tasks"]), families, version)
