"""The `rayrec` command line: one entry point, sub-commands owned by the package they concern.

Each package exposes ``register(subparsers)`` in its own ``cli.py``; handlers import their heavy
dependencies (torch, ray) lazily so ``rayrec --help`` answers in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Module paths, not imports: `cluster` launches the other packages without importing their models.
_COMMAND_MODULES = ("training.cli", "training.jobs.cli", "serving.cli", "serving.demo", "cluster.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayrec",
        description="rayrec: train (TorchRec + MPZCH on Ray Train) and serve (Ray Serve) recommenders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_path in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as err:  # a package without commands yet
            if err.name != module_path:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    result = args.handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
