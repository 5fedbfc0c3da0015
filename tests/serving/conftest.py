"""Fixtures for the serving tests: the toy run folder (see toy_run.py)."""

from __future__ import annotations

import pytest

from tests.serving.toy_run import ToyRun, write_toy_run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> ToyRun:
    return write_toy_run(tmp_path_factory.mktemp("project"))
