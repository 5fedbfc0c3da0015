"""Per-path Platt calibration: the fit recovers a planted map, rows take their path's map, and
the value model's z-scores stay on the uncalibrated prediction."""

from __future__ import annotations

import pytest
import torch

from training.models.calibration import MIN_SCALE, PathCalibration, fit_platt
from training.models.mbd import standardize
from training.models.value import ValueConfig, ValueModel


def _planted(n: int, a: float, b: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(n, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(a * x + b)).double()
    return x, y


def test_fit_recovers_a_planted_map():
    x, y = _planted(40_000, a=0.5, b=-1.5, seed=0)
    a, b = fit_platt(x, y)
    assert a == pytest.approx(0.5, abs=0.03) and b == pytest.approx(-1.5, abs=0.05)


def test_fit_keeps_order_when_the_logits_disagree_with_the_labels():
    x, y = _planted(5_000, a=-1.0, b=0.0, seed=1)  # higher logit, fewer positives
    a, b = fit_platt(x, y)
    assert a == MIN_SCALE  # never reverses, never collapses to a constant
    assert b == pytest.approx(float(torch.logit(y.mean())), abs=0.2)


def test_too_few_rows_or_one_class_is_the_identity():
    assert fit_platt(torch.randn(10), torch.ones(10)) == (1.0, 0.0)
    assert fit_platt(torch.randn(500), torch.zeros(500)) == (1.0, 0.0)


def test_rows_take_their_paths_map_and_the_maps_travel_with_the_state_dict():
    cal = PathCalibration(tasks=2)
    logits = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]])
    present = torch.tensor([False, True, True])
    torch.testing.assert_close(cal(logits, present), logits)  # unfitted: identity
    cal.set_map(0, 0, 2.0, 1.0)  # task 0, FM missing
    cal.set_map(0, 1, 0.5, -1.0)  # task 0, FM present
    out = cal(logits, present)
    torch.testing.assert_close(out[:, 0], torch.tensor([2.0 * 1.0 + 1.0, 0.5 * 2.0 - 1.0, 0.5 * 0.0 - 1.0]))
    torch.testing.assert_close(out[:, 1], logits[:, 1])
    copy = PathCalibration(tasks=2)
    copy.load_state_dict(cal.state_dict())
    torch.testing.assert_close(copy(logits, present), out)


def test_ranker_calibrates_predictions_and_value_z_scores_read_the_raw_ones():
    from tests.training.test_ranker import _batch, _tiny_model

    _, model = _tiny_model()
    kjt, dense, cohorts, _ = _batch()
    model.eval()
    with torch.no_grad():
        before = model(kjt, dense, cohorts)
        model.calibration.set_map(0, 0, 0.5, -2.0)  # "like", FM missing: the path of every row here
        after = model(kjt, dense, cohorts)
    raw = before.predictions["like"]
    torch.testing.assert_close(after.raw_predictions["like"], raw)
    torch.testing.assert_close(after.predictions["like"], torch.sigmoid(0.5 * torch.logit(raw) - 2.0))
    torch.testing.assert_close(after.predictions["rating"], before.predictions["rating"])  # regression: untouched
    value = ValueModel.from_config(ValueConfig.model_validate({"terms": [{"signal": "like", "transform": "z"}]}), {"like": "gaussian"})
    expected_z = standardize(raw, after.mbd_mean["like"], after.mbd_var["like"], "gaussian")
    torch.testing.assert_close(value(after), expected_z)
    torch.testing.assert_close(value.with_transform("raw")(after), after.predictions["like"])
