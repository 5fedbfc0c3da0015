"""The value model: raw / z-score / percentile transforms, weights from config, no retraining."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from training.models.ranker import RankerOutput
from training.models.value import ValueConfig, ValueModel, ValueTerm, apply_transform, check_value_config


def _outputs() -> RankerOutput:
    """Three candidates: a watch-time regression (natural units) and a loop probability."""
    return RankerOutput(
        predictions={"watch_time": torch.tensor([10.0, 100.0, 1000.0]), "loop": torch.tensor([0.2, 0.5, 0.1])},
        logits={},
        mbd_mean={"watch_time": torch.log1p(torch.tensor([10.0, 200.0, 2000.0])), "loop": torch.tensor([0.2, 0.2, 0.2])},
        mbd_var={"watch_time": torch.tensor([1.0, 1.0, 4.0]), "loop": torch.tensor([0.01, 0.04, 0.01])},
    )


FAMILIES = {"watch_time": "lognormal", "loop": "gaussian"}


def test_raw_is_the_weighted_sum_of_predictions():
    cfg = ValueConfig(terms=[ValueTerm(signal="watch_time", weight=0.01), ValueTerm(signal="loop", weight=2.0)])
    score = ValueModel.from_config(cfg, FAMILIES)(_outputs())
    torch.testing.assert_close(score, torch.tensor([0.1 + 0.4, 1.0 + 1.0, 10.0 + 0.2]))


def test_z_and_percentile_follow_the_cohort_statistics():
    out = _outputs()
    z = apply_transform(out.predictions["loop"], out.mbd_mean["loop"], out.mbd_var["loop"], "z", "gaussian")
    torch.testing.assert_close(z, torch.tensor([0.0, 1.5, -1.0]))
    pct = apply_transform(out.predictions["loop"], out.mbd_mean["loop"], out.mbd_var["loop"], "pct", "gaussian")
    torch.testing.assert_close(pct, torch.special.ndtr(z))
    assert float(pct[0]) == pytest.approx(0.5) and 0 < float(pct.min()) < float(pct.max()) < 1
    # lognormal: the z-score is taken on log1p(watch time)
    zw = apply_transform(out.predictions["watch_time"], out.mbd_mean["watch_time"], out.mbd_var["watch_time"], "z", "lognormal")
    expected = (torch.log1p(out.predictions["watch_time"]) - out.mbd_mean["watch_time"]) / out.mbd_var["watch_time"].sqrt()
    torch.testing.assert_close(zw, expected)


def test_debiasing_changes_the_order_that_raw_units_impose():
    """Raw watch time ranks the long item first; within its cohort it is below average."""
    out = _outputs()
    raw = ValueModel.from_config(ValueConfig(terms=[ValueTerm(signal="watch_time")]), FAMILIES)
    assert int(raw(out).argmax()) == 2
    assert int(raw.with_transform("pct")(out).argmax()) == 0  # the only one at its cohort mean


def test_weights_change_without_touching_the_model():
    out = _outputs()
    value = ValueModel.from_config(
        ValueConfig(terms=[ValueTerm(signal="watch_time", weight=1.0, transform="pct"),
                           ValueTerm(signal="loop", weight=0.0, transform="pct")]), FAMILIES)  # fmt: skip
    before = value(out)
    loop_heavy = value.reweighted({"loop": 5.0})
    after = loop_heavy(out)
    assert int(before.argmax()) != int(after.argmax())  # reweighting reorders
    torch.testing.assert_close(value(out), before)  # the original value model is unchanged
    # the new scores are exactly the transforms recombined: no model call involved
    pct = {s: apply_transform(out.predictions[s], out.mbd_mean[s], out.mbd_var[s], "pct", FAMILIES[s]) for s in FAMILIES}
    torch.testing.assert_close(after, pct["watch_time"] + 5.0 * pct["loop"])


def test_bad_terms_fail_loudly():
    out = _outputs()
    with pytest.raises(KeyError, match="not a ranker task"):
        ValueModel.from_config(ValueConfig(terms=[ValueTerm(signal="share")]), FAMILIES)(out)
    out.mbd_mean.pop("loop")
    with pytest.raises(ValueError, match="needs MBD statistics"):
        ValueModel.from_config(ValueConfig(terms=[ValueTerm(signal="loop", transform="z")]), FAMILIES)(out)
    with pytest.raises(ValidationError):
        ValueConfig.model_validate({"terms": [{"signal": "loop", "transform": "rank"}]})


def test_check_value_config_names_every_term_the_ranker_cannot_score():
    """What a server checks before it takes a value config: the same problems scoring would hit,
    found without scoring (unknown signal, z/pct of a signal MBD does not debias, no terms)."""
    tasks = ["watch_time", "loop", "comment"]
    check_value_config(ValueConfig(terms=[ValueTerm(signal="watch_time", transform="pct"), ValueTerm(signal="comment")]),
                       tasks, FAMILIES)  # fmt: skip
    bad = ValueConfig(terms=[ValueTerm(signal="share"), ValueTerm(signal="comment", transform="z"), ValueTerm(signal="loop")])
    with pytest.raises(ValueError) as err:
        check_value_config(bad, tasks, FAMILIES)
    assert "'share' is not a ranker task" in str(err.value) and "'comment' has no MBD statistics" in str(err.value)
    assert str(err.value).count("; ") == 1  # two problems: the valid 'loop' term is not one
    with pytest.raises(ValueError, match="no terms"):
        check_value_config(ValueConfig(), tasks, FAMILIES)
