"""``rayrec tune``: a grid over a few keys of a retrieval config on Ray Tune, scored on valid only.

Why a grid and not a search algorithm: issue #31's protocol asks that every hyperparameter be
chosen on the valid split with test read once per reported row; a small grid is a protocol a
reader can check line by line in ``sweep.json`` (every trial's overrides, its run folder and the
valid metrics of the epoch it serves), which a sampler's trajectory is not.

Each trial is one ordinary training run (``training.jobs.JOBS[cfg.kind].run``, its own Ray Train
workers) launched from a Ray Tune function trial that holds a token 0.01 CPU, so the trainer's
workers get the cluster's CPUs. A trial's score is the valid Recall@10 of the epoch the run
serves (:func:`training.early_stop.served_valid`: the best epoch with ``train.patience``, else
the last). The test split is never read to choose: the runs do compute their test metrics
(every run does), but the sweep neither reads nor reports them.

Writes into ``--out``: ``sweep.json`` (grid, trials, chosen) and ``chosen.yaml`` (the chosen
trial's resolved config). ``--write`` also sets the chosen values in the config file itself,
line by line, so its comments stay.

Example::

    rayrec tune --config configs/ml100k-seq.yaml --grid train.lr=0.001,0.003 \\
        --grid model.sequence.dropout=0.2,0.5 --out runs/tune/seq-lr-dropout --write
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from training.config import ConfigError, dump_config, load_config
from training.early_stop import METRIC, served_valid


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["train.lr=0.001,0.003", ...]`` → ``{"train.lr": [0.001, 0.003]}`` (values parsed as YAML)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like key.path=v1,v2")
        key, values = item.split("=", 1)
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def trials(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order the keys were given."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def overrides_of(trial: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in trial.items()]


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest valid Recall@10 (ties: the earlier trial in grid order)."""
    done = [r for r in results if r.get("valid", {}).get(METRIC.split("/", 1)[1]) is not None]
    if not done:
        raise RuntimeError("no trial finished with a valid Recall@10")
    return max(done, key=lambda r: (r["valid"][METRIC.split("/", 1)[1]], -r["trial"]))


def write_values(config_path: Path, values: dict[str, Any]) -> None:
    """Set ``values`` (dotted keys) in a YAML file by editing only the lines of those keys.

    Block-style mappings only (the configs' style); a key missing from the file is refused
    rather than appended, so the file's layout and comments never change otherwise.
    """
    lines = config_path.read_text().splitlines(keepends=True)
    for dotted, value in values.items():
        found, path = None, []  # path: (indent, key) of the mapping keys above the current line
        for i, line in enumerate(lines):
            match = re.match(r"^( *)([A-Za-z0-9_]+):", line)
            if not match:
                continue
            indent = len(match.group(1))
            path = [(n, k) for n, k in path if n < indent] + [(indent, match.group(2))]
            if [k for _, k in path] == dotted.split("."):
                found = i
                break
        if found is None:
            raise ConfigError(f"--write: {dotted} is not spelled out in {config_path}; set it there first")
        head, _, comment = re.match(r"^( *[A-Za-z0-9_]+:\s*)([^#\n]*?)(\s*#.*)?$", lines[found].rstrip("\n")).groups()
        rendered = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        lines[found] = f"{head}{rendered}{comment or ''}\n"
    config_path.write_text("".join(lines))


def _trial(config: dict[str, Any]) -> None:
    """One Ray Tune trial: an ordinary training run, reported by its served epoch's valid metrics."""
    import importlib

    from ray import tune

    from training.jobs import JOBS
    from training.runs import RunDir

    params = config["params"]
    os.chdir(params["cwd"])  # Tune starts a trial in its own folder; the config's relative paths mean the caller's
    cfg = load_config(params["config"], [*params["base"], *overrides_of(params["values"]), f"runs_dir={params['runs_dir']}"])
    run = importlib.import_module(JOBS[cfg.kind]).run(cfg, run_id=params["run_id"])
    valid = served_valid(RunDir.open(run.location).pull().read_metrics())
    tune.report({**{f"valid/{k}": v for k, v in valid.items()}, "run": str(run.location)})


def run_sweep(config: Path, grid: dict[str, list[Any]], base: list[str], out: Path, concurrent: int = 1) -> dict[str, Any]:
    """Train every grid point (``concurrent`` at a time) and choose on valid; writes ``sweep.json``
    and ``chosen.yaml`` into ``out`` and returns what ``sweep.json`` holds."""
    from ray import tune

    load_config(config, base)  # a bad base config fails here, before any trial starts
    points = trials(grid)
    for values in points:
        load_config(config, [*base, *overrides_of(values)])  # and so does a bad grid value
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = (out / "runs").resolve()
    space = [{"config": str(Path(config).resolve()), "base": base, "values": v, "runs_dir": str(runs_dir),
              "run_id": f"trial-{i:03d}", "cwd": os.getcwd()} for i, v in enumerate(points)]
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"cpu": 0.01}),  # a token CPU (Tune refuses 0): the trial's trainer asks for its workers' own
        param_space={"params": tune.grid_search(space)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, metric=METRIC, mode="max"),
        run_config=tune.RunConfig(name="sweep", storage_path=str((out / "tune").resolve()), verbose=0),
    )
    grid_results = tuner.fit()
    results = []
    for result in grid_results:
        params = result.config["params"]
        metrics = result.metrics or {}
        results.append({
            "trial": int(params["run_id"].split("-")[1]), "values": params["values"], "run": metrics.get("run"),
            "valid": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("valid/")},
            "error": None if result.error is None else str(result.error)[:500],
        })
    results.sort(key=lambda r: r["trial"])
    chosen = choose(results)
    cfg = load_config(config, [*base, *overrides_of(chosen["values"])])
    (out / "chosen.yaml").write_text(f"# rayrec tune: trial {chosen['trial']} of {len(results)}, chosen on valid "
                                     f"Recall@10 {chosen['valid']['recall@10']:.4f}\n" + dump_config(cfg))
    sweep = {"config": str(config), "base_overrides": base, "grid": grid, "metric": METRIC, "split": "valid",
             "trials": results, "chosen": chosen}
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    return sweep
