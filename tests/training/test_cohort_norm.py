"""The per-cohort normalisers (MBD's baselines): what each promises on its own fitting data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.models.cohort_norm import (
    CohortGroupbyNorm,
    CohortNormConfig,
    CohortQuantileNorm,
    GlobalNorm,
    fit_normaliser,
)
from training.models.mbd import standardize
from training.models.ranker import RankerOutput
from training.models.value import ValueConfig, ValueModel, ValueTerm

FAMILIES = {"watch": "lognormal", "loop": "gaussian"}


def _log(n: int = 4_000, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two cohort columns (3 × 4 cells) with cell-dependent signals; ``[N, 2]`` and ``[N]`` each."""
    rng = np.random.default_rng(seed)
    cohorts = np.stack([rng.integers(0, 3, n), rng.integers(0, 4, n)], 1)
    shift = cohorts[:, 0] * 1.5 - cohorts[:, 1] * 0.7
    values = {"watch": np.expm1(3.0 + shift + rng.normal(0, 0.5 + 0.2 * cohorts[:, 1], n)),
              "loop": (rng.random(n) < 1 / (1 + np.exp(-shift))).astype(np.float64)}  # fmt: skip
    masks = {"watch": np.ones(n), "loop": (rng.random(n) < 0.9).astype(np.float64)}
    return cohorts, values, masks


def _output(preds: dict[str, np.ndarray]) -> RankerOutput:
    t = {s: torch.from_numpy(p) for s, p in preds.items()}
    return RankerOutput(t, {}, raw_predictions=t)


def test_groupby_z_is_standard_within_each_cohort_on_its_fitting_data():
    cohorts, values, masks = _log()
    norm = CohortGroupbyNorm.fit(cohorts, values, masks, FAMILIES, min_count=1)
    out = norm.apply(_output(values), torch.from_numpy(cohorts))
    for s, family in FAMILIES.items():
        z = standardize(torch.from_numpy(values[s]), out.mbd_mean[s], out.mbd_var[s], family).numpy()
        for cell in np.unique(cohorts, axis=0):
            rows = (cohorts == cell).all(axis=1) & (masks[s] > 0)
            assert abs(z[rows].mean()) < 1e-9
            assert z[rows].std() == pytest.approx(1.0, abs=1e-9)


def test_unseen_and_small_cohorts_back_off_to_the_global_statistics():
    cohorts, values, masks = _log()
    cohorts[:5] = [2, 9]  # one cell with 5 rows: under min_count
    norm = CohortGroupbyNorm.fit(cohorts, values, masks, FAMILIES, min_count=10)
    glob = GlobalNorm.fit(values, masks, FAMILIES)
    query = torch.tensor([[7, 0], [0, 11], [2, 9], [-1, 0], [0, 0]])  # unseen ×2, small, negative, seen
    stats = norm.cohort_stats(query)
    for s in FAMILIES:
        mean, var = stats[s]
        assert torch.allclose(mean[:4], torch.full((4,), glob.stats[s][0], dtype=torch.float64))
        assert torch.allclose(var[:4], torch.full((4,), glob.stats[s][1], dtype=torch.float64))
        assert float(mean[4]) != pytest.approx(glob.stats[s][0])
    qn = CohortQuantileNorm.fit(cohorts, values, masks, FAMILIES, min_count=10)
    x = {s: torch.full((2,), float(np.median(values[s]))) for s in FAMILIES}
    pooled = qn.percentile(x, torch.tensor([[7, 0], [2, 9]]))
    for s in FAMILIES:  # both rows read the pooled distribution
        assert float(pooled[s][0]) == pytest.approx(float(pooled[s][1]))


def test_quantile_is_monotone_within_a_cohort_and_inside_zero_one():
    cohorts, values, masks = _log()
    norm = CohortQuantileNorm.fit(cohorts, values, masks, FAMILIES)
    for cell in ([0, 0], [2, 3]):
        for s in FAMILIES:
            grid = torch.linspace(float(values[s].min()) - 1, float(values[s].max()) + 1, 500).double()
            p = norm.percentile({s2: grid for s2 in FAMILIES}, torch.tensor([cell] * 500))[s]
            assert (p.diff() >= 0).all()
            assert float(p.min()) > 0 and float(p.max()) < 1
            assert float(p[-1]) > float(p[0])


def test_quantile_reaches_the_value_model_as_its_percentile():
    cohorts, values, masks = _log()
    preds = {"watch": values["watch"], "loop": np.clip(values["loop"] * 0.6 + 0.2, 0, 1)}
    norm = CohortQuantileNorm.fit(cohorts, preds, masks, FAMILIES)
    q = torch.from_numpy(cohorts)
    out = norm.apply(_output(preds), q)
    value = ValueModel.from_config(ValueConfig(terms=[ValueTerm(signal="watch", transform="pct")]), FAMILIES)
    pct = norm.percentile({s: torch.from_numpy(p) for s, p in preds.items()}, q)["watch"]
    assert torch.allclose(value(out).double(), pct, atol=1e-6)


@pytest.mark.parametrize("kind", ["global_z", "groupby_z", "quantile"])
def test_every_normaliser_feeds_the_value_model(kind: str):
    cohorts, values, masks = _log()
    norm = fit_normaliser(CohortNormConfig(kind=kind), cohorts, values, masks, FAMILIES)
    value = ValueModel.from_config(ValueConfig(terms=[ValueTerm(signal="watch", transform="z"),
                                                      ValueTerm(signal="loop", transform="pct")]), FAMILIES)  # fmt: skip
    score = value(norm.apply(_output(values), torch.from_numpy(cohorts)))
    assert score.shape == (len(cohorts),) and torch.isfinite(score).all()
