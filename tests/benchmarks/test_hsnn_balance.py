"""``benchmarks/hsnn_balance.py``: a capped tree's cost is read against the greedy tree of the
same run and beam, and a tree's leaf statistics say what the cap promises."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.hsnn_balance import leaf_stats, paired_with_greedy, summarise  # noqa: E402
from training.models.hsnn_tree import HSNNTree  # noqa: E402

KEYS = ("top100_overlap_vs_own_exact", "recall@10", "ndcg@10", "items_scored")


def _record(run: str, ratio, beam: int, overlap: float) -> dict:
    return {"run": run, "max_leaf_ratio": ratio, "beam": beam, "max_over_mean": 1.0, "max_over_mean_nonempty": 1.0,
            "empty_leaf_share": 0.0, "recall@10": 0.1, "ndcg@10": 0.05, "recall@50": 0.3, "recall@100": 0.5,
            "cold_recall@50": 0.0, "top1pct_share@10": 0.1, "top100_overlap_vs_own_exact": overlap, "items_scored": 300.0}


def test_capped_settings_are_paired_with_the_greedy_tree_of_the_same_run_and_beam():
    per_run = [{"run": r, "max_leaf_ratio": "popularity", "beam": 0, **dict.fromkeys(KEYS, 0.0)} for r in "ab"]
    for run, shift in (("a", 0.0), ("b", 0.1)):  # run b's trees all find 0.1 more: pairing removes it
        per_run += [_record(run, None, 64, 0.90 + shift), _record(run, 4.0, 64, 0.88 + shift),
                    _record(run, None, 16, 0.80 + shift), _record(run, 4.0, 16, 0.79 + shift)]
    paired = {(d["max_leaf_ratio"], d["beam"]): d for d in paired_with_greedy(per_run)}
    assert set(paired) == {(4.0, 64), (4.0, 16)}  # no row for greedy itself or popularity
    mean, se = paired[(4.0, 64)]["top100_overlap_vs_own_exact"]
    assert abs(mean + 0.02) < 1e-9 and se is not None and se < 1e-9
    table, rows = summarise(per_run, "ml-100k")
    assert [(t["max_leaf_ratio"], t["beam"]) for t in table][0] == ("popularity", 0)
    assert {r["system"] for r in rows} == {"popularity", "hsnn_beam"}
    assert all("max_leaf_ratio" not in r.get("params", {}) for r in rows if r["system"] == "popularity")


def test_leaf_stats_read_the_largest_leaf_against_the_mean_leaf():
    codebooks = torch.zeros(2, 2, 3)  # 4 leaves
    codes = torch.tensor([[0, 0]] * 5 + [[0, 1], [1, 0], [1, 0]])  # leaf sizes 5, 1, 2, 0
    tree = HSNNTree(codebooks, torch.arange(8), codes)
    stats = leaf_stats(tree)
    assert stats["max_leaf"] == 5 and stats["max_over_mean"] == 5 / 2
    assert abs(stats["max_over_mean_nonempty"] - 5 / (8 / 3)) < 1e-9 and stats["empty_leaf_share"] == 0.25
