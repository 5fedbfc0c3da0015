"""The ranker stage in-process (no Ray): value model, FM present vs missing, top-k."""

from __future__ import annotations

import pytest
import torch

from serving.ranker import RankingStage, RankQuery, pairs_of
from tests.serving.stand_in_models import CLICK_ONLY, WATCH_ONLY, load_stand_in
from training.models.value import ValueConfig, ValueTerm

CANDIDATES = list(range(1000, 1040))


def test_value_config_swap_reorders_candidates() -> None:
    stage = RankingStage(load_stand_in(""))
    query = [RankQuery(user_id=5, candidates=CANDIDATES, k=40)]
    (by_click, _), = stage.rank(query, None, None)
    stage.set_value(WATCH_ONLY)
    (by_watch, _), = stage.rank(query, None, None)
    assert sorted(by_click) == sorted(by_watch) == CANDIDATES
    assert by_watch == by_click[::-1]  # the stand-in's tasks have opposite item effects
    stage.set_value(CLICK_ONLY)
    assert stage.rank(query, None, None)[0][0] == by_click


def test_fm_rows_change_scores_only_where_present() -> None:
    stage = RankingStage(load_stand_in(""))
    queries = [RankQuery(5, CANDIDATES[:10], 10), RankQuery(6, CANDIDATES[10:15], 3)]
    fm, present = stage.compute_fm(queries)
    assert fm.shape == (15, 8) and present.all()
    users, items = pairs_of(queries)
    assert users.tolist() == [5] * 10 + [6] * 5 and items.tolist() == CANDIDATES[:15]
    missing = stage.rank(queries, None, None)
    with_fm = stage.rank(queries, fm, present)
    half = present.clone()
    half[5:] = False  # only query 0's first five pairs have FM rows
    mixed = stage.rank(queries, fm, half)
    assert [len(ids) for ids, _ in with_fm] == [10, 3]
    assert with_fm[0][1] != missing[0][1]
    assert mixed[1] == missing[1]  # query 1 had no FM row: the missing path, same scores
    score = dict(zip(*mixed[0]))
    full = dict(zip(*with_fm[0]))
    for item in CANDIDATES[:5]:
        assert abs(score[item] - full[item]) < 1e-6
    assert torch.is_tensor(fm)


def test_a_value_config_the_models_cannot_serve_is_refused_and_the_old_one_kept() -> None:
    """Checked when set, not when scoring: before, the stage took it and every rank() raised."""
    stage = RankingStage(load_stand_in(""))
    query = [RankQuery(user_id=5, candidates=CANDIDATES, k=40)]
    before = stage.rank(query, None, None)
    for bad, match in (
        (ValueConfig(terms=[ValueTerm(signal="watch"), ValueTerm(signal="nope")]), "'nope' is not a ranker task"),
        (ValueConfig(terms=[ValueTerm(signal="click", transform="z")]), "'click' has no MBD statistics"),
        (ValueConfig(terms=[]), "no terms"),
    ):
        with pytest.raises(ValueError, match=match):
            stage.set_value(bad)
        assert stage.value == CLICK_ONLY and stage.rank(query, None, None) == before
