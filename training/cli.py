"""argparse sub-commands of the ``training`` package: ``data`` (and, next, ``train`` / ``eval``).

Registered by ``cluster/cli.py``. Handlers import numpy/pyarrow (and anything heavier) lazily so
``rayrec --help`` stays fast; each returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the training package's commands to ``rayrec``."""
    _register_data(subparsers)
    # >>> train / eval registrations go here (`_register_train(subparsers)`, `_register_eval(subparsers)`),
    # >>> each in its own `_register_*` function below the data commands.


# ---- rayrec data prepare|synth ------------------------------------------------------------------


def _count(text: str) -> int:
    """A positive count; underscores are allowed as in Python literals (``10_000_000``)."""
    try:
        value = int(text.replace(",", "_"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _register_data(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="build datasets in the rayrec layout (data/<name>/: Parquet splits, items, users, dataset.json)",
        description="Build a dataset folder that training reads: interactions/{train,valid,test}.parquet "
        "(leave-one-out by time per user), items.parquet, users.parquet and dataset.json.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="download a public dataset (ml-100k from the recbole wheel) and write it in the rayrec layout",
        description="Fetch the recbole wheel with pip (cached), read MovieLens-100K out of it and write "
        "data/ml-100k/. Re-running on a complete folder does nothing unless --force.",
    )
    prepare.add_argument("name", choices=["ml-100k"], help="which dataset to prepare")
    prepare.add_argument("--out", type=Path, default=None, help="output folder (default: data/<name>)")
    prepare.add_argument("--cache", type=Path, default=None, help="download cache (default: $RAYREC_CACHE or ~/.cache/rayrec)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if the output folder is complete")
    prepare.set_defaults(handler=_data_prepare)

    synth = actions.add_parser(
        "synth",
        help="generate a synthetic dataset (raw 64-bit IDs, Zipf popularity, item churn, biased engagement signals)",
        description="Stream a synthetic dataset to disk with bounded memory (row groups of --chunk-rows); "
        "the generative model is documented in training/data/synth.py and recorded in dataset.json. "
        "Numbers may contain underscores: --interactions 100_000_000.",
    )
    synth.add_argument("--out", type=Path, default=Path("data/synth"), help="output folder (default: %(default)s)")
    synth.add_argument("--users", type=_count, default=10_000, help="number of users (default: %(default)s)")
    synth.add_argument("--items", type=_count, default=5_000, help="number of items (default: %(default)s)")
    synth.add_argument("--interactions", type=_count, default=200_000, help="number of interactions (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: %(default)s)")
    synth.add_argument("--chunk-rows", type=_count, default=1_000_000, help="interactions per chunk / row group (default: %(default)s)")
    synth.add_argument("--days", type=_count, default=90, help="time span of the interactions in days (default: %(default)s)")
    synth.add_argument("--force", action="store_true", help="rebuild even if the folder holds this exact dataset")
    synth.set_defaults(handler=_data_synth)


def _log_progress() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def _summary(info: dict, out: Path, seconds: float) -> None:
    counts = info["counts"]
    print(
        f"{info['name']} in {out}: {info['num_interactions']:,} interactions, {info['num_users']:,} users, "
        f"{info['num_items']:,} items; train/valid/test = {counts['train']:,}/{counts['valid']:,}/{counts['test']:,} "
        f"({seconds:.1f} s)"
    )
    print(f"split: {json.dumps(info['split'])}")


def _data_prepare(args: argparse.Namespace) -> int:
    from training.data.movielens import prepare_ml100k
    from training.data.schema import DatasetError

    _log_progress()
    out = args.out or Path("data") / args.name
    started = time.perf_counter()
    try:
        info = prepare_ml100k(out, cache_dir=args.cache, force=args.force)
    except (DatasetError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _summary(info, out, time.perf_counter() - started)
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from training.data.synth import generate_synth

    _log_progress()
    started = time.perf_counter()
    try:
        info = generate_synth(
            args.out,
            users=args.users,
            items=args.items,
            interactions=args.interactions,
            seed=args.seed,
            chunk_rows=args.chunk_rows,
            days=args.days,
            force=args.force,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _summary(info, args.out, time.perf_counter() - started)
    return 0
