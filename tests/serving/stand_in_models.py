"""Small real torch models behind serving's ranker interfaces, for tests (and the benchmark).

``serving.ranking_models`` defines what the ranker stage needs: a ``CandidateScorer`` and an
``FMScorer``. Until a trained ranker artifact is at hand, these stand in for them:

- :class:`StandInFM`: hashed user and item embeddings → a small MLP → ``[N, D]`` (with
  ``extra_layers`` to make it as slow as a real FM should be, for the benchmark).
- :class:`StandInRanker`: two tasks, ``click`` and ``watch``, whose item biases are opposite,
  so a value model weighting only ``click`` orders candidates the reverse of one weighting only
  ``watch`` (what the hot-swap test needs). The FM embedding adds ``fm · w`` to the click
  logit; a missing FM row uses a learned-like constant ``missing`` instead.

Both are seeded: every replica that loads them builds the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from serving.ranking_models import RankingModels
from training.models.value import ValueConfig, ValueTerm

BUCKETS = 4093
FM_DIM = 8
FM_VERSION = "stand-in-fm/v1"
RANKER_VERSION = "stand-in-ranker/v1"
CLICK_ONLY = ValueConfig(terms=[ValueTerm(signal="click", weight=1.0)])
WATCH_ONLY = ValueConfig(terms=[ValueTerm(signal="watch", weight=1.0)])


@dataclass
class StandInOutput:
    """Duck-types ``training.models.ranker.RankerOutput`` for the value model: dicts of [N]."""

    predictions: dict[str, torch.Tensor]
    mbd_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    mbd_var: dict[str, torch.Tensor] = field(default_factory=dict)


class StandInFM(nn.Module):
    """(user_ids [N], item_ids [N]) → [N, D]; ``extra_layers`` square layers add cost."""

    def __init__(self, dim: int = FM_DIM, extra_layers: int = 0, width: int = 32) -> None:
        super().__init__()
        self.version, self.dim = FM_VERSION, dim
        self.user = nn.Embedding(BUCKETS, width)
        self.item = nn.Embedding(BUCKETS, width)
        layers: list[nn.Module] = [nn.Linear(2 * width, width), nn.Tanh()]
        for _ in range(extra_layers):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.mlp = nn.Sequential(*layers, nn.Linear(width, dim))

    @torch.no_grad()
    def forward(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user(user_ids % BUCKETS), self.item(item_ids % BUCKETS)], dim=1)  # [N, 2W]
        return self.mlp(x)  # [N, D]


class StandInRanker(nn.Module):
    """score(users [N], candidates [N], fm [N, D] | None, fm_present [N]) → StandInOutput."""

    def __init__(self, dim: int = FM_DIM) -> None:
        super().__init__()
        self.click_bias = nn.Embedding(BUCKETS, 1)
        self.fm_weight = nn.Parameter(torch.randn(dim))
        self.missing = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def score(
        self, user_ids: np.ndarray, candidates: np.ndarray, fm: torch.Tensor | None = None, fm_present: torch.Tensor | None = None
    ) -> StandInOutput:
        items = torch.from_numpy(np.asarray(candidates, dtype=np.int64)) % BUCKETS
        bias = self.click_bias(items).squeeze(1)  # [N]
        fm_term = self.missing.expand_as(bias)
        if fm is not None:
            present = torch.ones_like(bias, dtype=torch.bool) if fm_present is None else fm_present
            fm_term = torch.where(present, fm @ self.fm_weight, fm_term)  # [N]
        click = torch.sigmoid(bias + fm_term)
        watch = torch.sigmoid(-bias)  # opposite item effect: reweighting reorders
        return StandInOutput({"click": click, "watch": watch})


def load_stand_in(run_dir: str, extra_layers: int = 0) -> RankingModels:
    """Models factory (``"tests.serving.stand_in_models:load_stand_in"``); ``run_dir`` unused."""
    torch.manual_seed(0)
    fm = StandInFM(extra_layers=extra_layers).eval()
    ranker = StandInRanker().eval()
    return RankingModels(scorer=ranker, fm=fm, value=CLICK_ONLY, signals=("click", "watch"), families={}, version=RANKER_VERSION)


def load_heavy_stand_in(run_dir: str) -> RankingModels:
    """A stand-in whose FM costs ~24 MLP layers per pair (benchmarks: an FM worth precomputing)."""
    return load_stand_in(run_dir, extra_layers=24)
