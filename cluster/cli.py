"""The `rayrec` command line: one entry point, sub-commands owned by the package they concern.

Each package exposes ``register(subparsers)`` in its own ``cli.py``; handlers import their heavy
dependencies (torch, ray) lazily so ``rayrec --help`` answers in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Module paths, not imports: `cluster` launches the other packages without importing their models.
_COMMAND_MODULES = ("training.cli", "training.jobs.cli", "serving.cli", "serving.demo", "cluster.commands")
VERBOSE_ENV = "RAYREC_VERBOSE"  # training.log_setup.VERBOSE_ENV
_VERBOSE_HELP = ("also print what Ray, its workers and the libraries log (by default it stays in the Ray "
                 "session's log folder, which commands name)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrec",
        description="rayrec: train (TorchRec + MPZCH on Ray Train) and serve (Ray Serve) recommenders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_path in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as err:  # a package without commands yet
            if err.name != module_path:
                raise
            continue
        module.register(subparsers)
    for command in subparsers.choices.values():  # `rayrec demo --verbose` as well as `rayrec --verbose demo`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:  # read by training.log_setup wherever this process starts or joins Ray
        os.environ[VERBOSE_ENV] = "1"
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    result = args.handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
