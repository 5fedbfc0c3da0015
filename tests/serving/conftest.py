"""Fixtures for the serving tests: the toy run folder (see toy_run.py) and the app served on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.serving.toy_run import ToyRun, write_toy_run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> ToyRun:
    return write_toy_run(tmp_path_factory.mktemp("project"))


@contextmanager
def served_toy_app(toy_run: ToyRun, port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app with the shipped settings on the toy run at ``port`` (its URL); Serve is shut
    down afterwards so the next module starts clean."""
    from serving.app import ServingSettings, serve_app
    from serving.serve_env import shutdown_serve

    settings = ServingSettings(feedback_dir=str(tmp_path_factory.mktemp("feedback")))
    try:
        yield serve_app(toy_run.run_dir, port=port, settings=settings)
    finally:
        shutdown_serve()
