"""MBD heads recover planted cohort means and variances; gradient isolation is what it says."""

from __future__ import annotations

import math

import pytest
import torch

from training.models.mbd import MBDBranch, MBDSignal, standardize, target_scale

# four cohorts with planted means and standard deviations (in the family's space)
MEANS = torch.tensor([-1.0, 0.5, 2.0, 3.5])
STDS = torch.tensor([0.3, 1.0, 0.6, 1.5])
LOG_SHIFT = 2.5  # lognormal signals are non-negative: plant their log-space means above 0


def _planted(n: int, family: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cohort one-hots ``[n, 4]`` and signals ``[n]``: N(μ_c, σ_c²), or exp of it minus 1."""
    g = torch.Generator().manual_seed(seed)
    cohort = torch.randint(0, 4, (n,), generator=g)
    y = MEANS[cohort] + STDS[cohort] * torch.randn(n, generator=g)
    if family == "lognormal":
        y = torch.expm1(y + LOG_SHIFT)  # log1p(y) ~ N(μ_c + shift, σ_c²): heavy-tailed, > 0
    return torch.nn.functional.one_hot(cohort, 4).float(), y


def _fit(family: str) -> MBDBranch:
    torch.manual_seed(0)
    x, y = _planted(6_000, family, seed=1)
    mbd = MBDBranch([MBDSignal("s", family)], in_dim=4, hidden=[])  # linear in the one-hot: one (μ, σ) per cohort
    opt = torch.optim.Adam(mbd.parameters(), lr=0.05)
    for _ in range(600):  # full batch: a few thousand rows, tiny heads
        loss = mbd.loss(mbd(x), {"s": y}, {"s": torch.ones(len(y))})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mbd


@pytest.mark.parametrize("family", ["gaussian", "lognormal"])
def test_heads_recover_planted_cohort_means_and_variances(family):
    mbd = _fit(family)
    with torch.no_grad():
        mean, var = mbd(torch.eye(4))["s"]
    planted = MEANS + (LOG_SHIFT if family == "lognormal" else 0.0)
    torch.testing.assert_close(mean, planted, atol=0.1, rtol=0)
    torch.testing.assert_close(var.sqrt(), STDS, atol=0.1, rtol=0.1)


def _mean_error_after(steps: int, scaled: bool) -> float:
    """Max |fitted - planted| cohort mean of a lognormal signal (log-space means 1.5..6) after
    ``steps`` Adam steps at a trunk-like learning rate, with or without the target scale."""
    torch.manual_seed(0)
    x, y = _planted(4_000, "lognormal", seed=2)
    mbd = MBDBranch([MBDSignal("s", "lognormal")], in_dim=4, hidden=[16])
    if scaled:
        mbd.set_target_scale({"s": target_scale(y, torch.ones(len(y)), "lognormal")})
    opt = torch.optim.Adam(mbd.parameters(), lr=0.003)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        rows = torch.randint(0, len(y), (256,), generator=g)
        loss = mbd.loss(mbd(x[rows]), {"s": y[rows]}, {"s": torch.ones(256)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((mbd(torch.eye(4))["s"][0] - (MEANS + LOG_SHIFT)).abs().max())


def test_target_scale_lets_heads_reach_far_cohort_means_in_few_steps():
    assert _mean_error_after(300, scaled=True) < 0.15  # measured 0.06
    assert _mean_error_after(300, scaled=False) > 0.3  # measured 0.50: what ~300 steps leave unscaled


def test_target_scale_travels_with_the_state_dict():
    a = MBDBranch([MBDSignal("s", "lognormal")], in_dim=4, hidden=[8])
    a.set_target_scale({"s": (4.0, 2.0)})
    b = MBDBranch([MBDSignal("s", "lognormal")], in_dim=4, hidden=[8])
    b.load_state_dict(a.state_dict())
    x = torch.eye(4)
    with torch.no_grad():
        torch.testing.assert_close(a(x)["s"][0], b(x)["s"][0])
        torch.testing.assert_close(a(x)["s"][1], b(x)["s"][1])
    assert float(b.target_loc[0]) == 4.0 and float(b.target_scale[0]) == 2.0


def test_lognormal_z_score_of_a_cohort_median_is_zero():
    mean, var = torch.tensor([2.0]), torch.tensor([0.25])
    median = torch.expm1(mean)  # the natural-unit value whose log1p is the cohort mean
    assert float(standardize(median, mean, var, "lognormal")) == pytest.approx(0.0, abs=1e-5)
    one_sd_up = torch.expm1(mean + 0.5)
    assert float(standardize(one_sd_up, mean, var, "lognormal")) == pytest.approx(1.0, abs=1e-4)


def test_masked_rows_do_not_move_the_estimate():
    mbd = MBDBranch([MBDSignal("s")], in_dim=1, hidden=[])
    x = torch.ones(4, 1)
    stats = mbd(x)
    y = torch.tensor([1.0, 1.0, 1000.0, -1000.0])
    with_outliers = mbd.loss(stats, {"s": y}, {"s": torch.tensor([1.0, 1.0, 0.0, 0.0])})
    expected = torch.nn.functional.gaussian_nll_loss(stats["s"][0][:2], y[:2], stats["s"][1][:2])
    assert math.isclose(float(with_outliers), float(expected), rel_tol=1e-5)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_isolates_the_shared_cohort_embeddings(stop_gradient):
    shared = torch.nn.Embedding(4, 3)  # stands in for the ranker's shared cohort embeddings
    mbd = MBDBranch([MBDSignal("s")], in_dim=3, hidden=[8], stop_gradient=stop_gradient)
    stats = mbd(shared(torch.tensor([0, 1, 2, 3])))
    mbd.loss(stats, {"s": torch.tensor([0.0, 1.0, 2.0, 3.0])}, {"s": torch.ones(4)}).backward()
    assert all(p.grad is not None for p in mbd.parameters())  # the heads always learn
    if stop_gradient:
        assert shared.weight.grad is None
    else:
        assert shared.weight.grad is not None and float(shared.weight.grad.abs().sum()) > 0
