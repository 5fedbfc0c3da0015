"""``rayrec train``, ``rayrec tune`` and ``rayrec eval``: run a training job, a grid of them
chosen on valid, score a finished run."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="Train a model from a YAML run config on Ray Train (2 workers by default).",
        description=(
            "Validate the config, create runs/<run-id>/ (config.yaml, meta.json), train on Ray Train "
            "workers with sharded MPZCH tables, checkpoint every epoch and export the serving index. "
            "Re-running with the same --run-id resumes from its latest checkpoint. With --continue RUN "
            "--feedback LOG: train the run on the feedback events since its watermark and export the next version."
        ),
    )
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="run config YAML, e.g. configs/ml100k.yaml")
    source.add_argument("--continue", dest="continue_run", metavar="RUN",
                        help="train the run's newest version (a two_tower, mfli or hsnn run) on the feedback since "
                             "its checkpoint's watermark, with the items the app added live (<feedback>/catalogue/), "
                             "and export the next version (runs/<id>-c<n>); needs --feedback")
    train.add_argument("--feedback", help="with --continue: the feedback log, serving's folder or its archive URI "
                                          "(e.g. data/feedback or s3://bucket/feedback)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    train.add_argument("--run-id", help="run folder name (default: <config-stem>-<UTC time>); an existing one resumes")
    train.add_argument("--runs-dir", help="parent folder of runs: a path or a URI such as s3://bucket/runs (default: the config's runs_dir)")
    train.add_argument("--address", help="Ray cluster to join (default: an existing RAY_ADDRESS, else a local Ray)")
    train.add_argument("--check", action="store_true", help="only validate the config and print it resolved")
    train.set_defaults(handler=_train)

    tune = subparsers.add_parser(
        "tune",
        help="Grid-search a few config keys on Ray Tune, each point a training run, chosen on valid Recall@10.",
        description=(
            "Train every point of the grid (one ordinary run each, under OUT/runs), score each by the valid "
            "Recall@10 of the epoch it serves, and write OUT/sweep.json and OUT/chosen.yaml; the test split "
            "is never used to choose. --write also sets the chosen values in the config file."
        ),
    )
    tune.add_argument("--config", required=True, help="run config YAML, e.g. configs/ml100k-seq.yaml")
    tune.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                      help="a key and its values, e.g. --grid train.lr=0.001,0.003 (repeatable: the grid is the product)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override applied to every trial, e.g. --set train.epochs=20")
    tune.add_argument("--out", required=True, help="folder for sweep.json, chosen.yaml and the trials' runs")
    tune.add_argument("--concurrent", type=int, default=1, help="trials at once (each takes its workers' CPUs)")
    tune.add_argument("--write", action="store_true", help="set the chosen values in --config itself (its comments stay)")
    tune.set_defaults(handler=_tune)

    ev = subparsers.add_parser(
        "eval",
        help="Score a finished run's serving index on the test split (full ranking, seen masked).",
        description="Recall/NDCG/MRR@K of the run's exported embeddings with exact search and FAISS baselines.",
    )
    ev.add_argument("--run", required=True, help="run folder, e.g. runs/ml100k-20261123-120000")
    ev.add_argument("--ks", default="10,50,100", help="comma-separated cut-offs (default 10,50,100)")
    ev.add_argument("--faiss", action="store_true", help="also score FAISS IVF-Flat and HNSW over the same embeddings")
    ev.set_defaults(handler=_eval)


def _train(args: argparse.Namespace) -> int:
    from training.config import ConfigError, dump_config, load_config
    from training.jobs import JOBS

    if args.continue_run:
        return _continue(args)
    if args.feedback:
        print("rayrec train: --feedback goes with --continue RUN", file=sys.stderr)
        return 2

    overrides = list(args.overrides)
    if args.runs_dir:
        overrides.append(f"runs_dir={args.runs_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"rayrec train: {err}", file=sys.stderr)
        return 2
    if args.check:
        print(dump_config(cfg), end="")
        return 0
    from training.log_setup import configure_logging, init_ray, where_logs_are

    configure_logging()
    if args.address:
        init_ray(address=args.address)
    else:
        init_ray()
    print(where_logs_are(), flush=True)
    job = importlib.import_module(JOBS[cfg.kind])
    t0 = time.perf_counter()
    run = job.run(cfg, run_id=args.run_id, config_stem=Path(args.config).stem)
    run.pull()  # a run in object storage: what the workers published
    print(f"run folder: {run.location}  ({time.perf_counter() - t0:.0f}s)")
    if run.eval_path.exists():
        metrics = run.read_json(run.eval_path)
        print("test: " + "  ".join(f"{k.removeprefix('test/')}={v:.4f}" for k, v in metrics.items() if "@10" in k and "mrr" not in k))
    return 0


def _continue(args: argparse.Namespace) -> int:
    """``rayrec train --continue RUN --feedback LOG``: the next version of a run, or a no-op."""
    from training.config import ConfigError
    from training.data.feedback import FeedbackError
    from training.jobs.continue_retrieval import ContinueError, continue_run
    from training.log_setup import configure_logging, init_ray, where_logs_are

    if not args.feedback:
        print("rayrec train: --continue needs --feedback (the feedback log folder or URI)", file=sys.stderr)
        return 2
    if args.check:
        print("rayrec train: --check validates a --config; it does not apply to --continue", file=sys.stderr)
        return 2
    configure_logging()
    if args.address:
        init_ray(address=args.address)
    t0 = time.perf_counter()
    try:
        done = continue_run(args.continue_run, args.feedback, args.overrides, run_id=args.run_id, runs_dir=args.runs_dir)
    except (ContinueError, FeedbackError, ConfigError) as err:
        print(f"rayrec train --continue: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    if done.run is None:
        print(done.message)
        return 0
    print(where_logs_are(), flush=True)
    done.run.pull()
    print(f"{done.message}  ({time.perf_counter() - t0:.0f}s)")
    print(f"run folder: {done.run.location}  version: {done.run.read_json(done.run.index_dir / 'index.json')['version']}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from training.config import ConfigError, load_config
    from training.log_setup import configure_logging, init_ray
    from training.tune import overrides_of, parse_grid, run_sweep, trials, write_values

    try:
        grid = parse_grid(args.grid)
        cfg = load_config(args.config, list(args.overrides))
        for values in trials(grid):  # every grid point validates before Ray starts
            load_config(args.config, [*args.overrides, *overrides_of(values)])
        configure_logging()
        # logical CPUs for every concurrent trial's workers plus the trials' token CPUs: a local
        # Ray sized to the machine (2 here) could place no trainer beside a trial, and hang
        need = math.ceil(args.concurrent * (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 0.01))
        init_ray(num_cpus=max(os.cpu_count() or 1, need))
        sweep = run_sweep(Path(args.config), grid, list(args.overrides), Path(args.out), args.concurrent)
        chosen = sweep["chosen"]
        for trial in sweep["trials"]:
            mark = "*" if trial["trial"] == chosen["trial"] else " "
            print(f"{mark} {trial['values']}  valid recall@10 {trial['valid'].get('recall@10', float('nan')):.4f}"
                  + (f"  error: {trial['error']}" if trial["error"] else ""))
        if args.write:
            write_values(Path(args.config), chosen["values"])
            print(f"wrote {chosen['values']} into {args.config}")
    except (ConfigError, RuntimeError) as err:
        print(f"rayrec tune: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    print(f"sweep: {Path(args.out) / 'sweep.json'}  chosen: {Path(args.out) / 'chosen.yaml'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from training.eval.run_eval import evaluate_run, format_table

    ks = [int(k) for k in args.ks.split(",")]
    rows = evaluate_run(Path(args.run), ks=ks, faiss=args.faiss)
    print(format_table(rows, ks))
    return 0
