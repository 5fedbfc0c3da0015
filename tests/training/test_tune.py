"""``rayrec tune`` (training/tune.py): the grid, the choice on valid only, the config edit that
keeps comments, and one real 2-point sweep of the tiny config on Ray Tune."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from training.config import ConfigError, load_config
from training.tune import choose, parse_grid, trials, write_values


def test_the_grid_is_the_product_of_the_values_in_key_order():
    grid = parse_grid(["train.lr=0.001,0.003", "model.sequence.dropout=0.2,0.5", "model.hidden=[64]"])
    assert grid == {"train.lr": [0.001, 0.003], "model.sequence.dropout": [0.2, 0.5], "model.hidden": [[64]]}
    assert trials(grid)[1] == {"train.lr": 0.001, "model.sequence.dropout": 0.5, "model.hidden": [64]}
    assert len(trials(grid)) == 4
    with pytest.raises(ConfigError):
        parse_grid(["train.lr"])


def test_choice_is_on_valid_recall_and_a_tie_keeps_the_earlier_trial():
    results = [{"trial": 0, "valid": {"recall@10": 0.2}}, {"trial": 1, "valid": {"recall@10": 0.3}},
               {"trial": 2, "valid": {"recall@10": 0.3}}, {"trial": 3, "valid": {}, "error": "boom"}]
    assert choose(results)["trial"] == 1
    with pytest.raises(RuntimeError):
        choose([{"trial": 0, "valid": {}}])


def test_write_changes_only_the_chosen_lines(tmp_path: Path):
    path = tmp_path / "seq.yaml"
    original = (REPO / "configs" / "ml100k-seq.yaml").read_text()
    path.write_text(original)
    write_values(path, {"train.lr": 0.001, "model.sequence.dropout": 0.5, "model.hidden": [64], "model.sequence.max_len": 40})
    changed = [(a, b) for a, b in zip(original.splitlines(), path.read_text().splitlines()) if a != b]
    assert len(changed) == 4 and len(path.read_text().splitlines()) == len(original.splitlines())
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.model.sequence.dropout, cfg.model.hidden, cfg.model.sequence.max_len) == (0.001, 0.5, [64], 40)
    max_len = next(b for a, b in changed if "max_len" in a)
    assert max_len.split("#")[1] == next(a for a in original.splitlines() if "max_len:" in a).split("#")[1]  # comment kept
    with pytest.raises(ConfigError, match="not spelled out"):
        write_values(path, {"train.weight_decay": 0.1})


def test_a_two_point_sweep_on_ray_tune_chooses_on_valid(ray_session, ml100k_dir: Path, tmp_path: Path):
    from training.tune import run_sweep

    # a relative data path, as the configs have: it must mean the caller's folder, not the trial's
    base = [f"data.path={os.path.relpath(ml100k_dir)}", "train.epochs=1", "train.max_steps_per_epoch=5", "eval.max_users=200"]
    sweep = run_sweep(REPO / "configs" / "tiny.yaml", parse_grid(["train.lr=0.0001,0.01"]), base, tmp_path / "sweep")
    assert [t["values"] for t in sweep["trials"]] == [{"train.lr": 0.0001}, {"train.lr": 0.01}]
    assert all(t["error"] is None and 0 <= t["valid"]["recall@10"] <= 1 for t in sweep["trials"])
    best = max(sweep["trials"], key=lambda t: t["valid"]["recall@10"])
    assert sweep["chosen"]["trial"] == best["trial"] and sweep["split"] == "valid"
    assert not any(k.startswith("test") for t in sweep["trials"] for k in t["valid"])  # test never enters the choice
    chosen = yaml.safe_load((tmp_path / "sweep" / "chosen.yaml").read_text())
    assert chosen["train"]["lr"] == best["values"]["train.lr"]
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["chosen"]["run"] == best["run"]
