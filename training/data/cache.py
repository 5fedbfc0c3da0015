"""The download cache for source data: where it lives and how the RecBole wheel gets there.

MovieLens-100K comes from the ``recbole`` wheel on PyPI (it ships the data set under
``recbole/dataset_example/ml-100k/``). A package registry is the only network these machines
reach, and pip knows how to fetch from it; the wheel is kept in the cache so tests and re-runs
never download twice. RecBole itself is never installed or imported: the wheel is read as a
zip file. MovieLens terms apply, so the wheel lives in a user cache, never in the repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# Pinned so every checkout reads the same bytes; the counts checked in movielens.py
# (100,000 / 943 / 1,682) would catch a wheel that ships something else.
RECBOLE_REQUIREMENT = "recbole==1.2.1"


def default_cache_dir() -> Path:
    """``$RAYREC_CACHE`` if set, else ``~/.cache/rayrec``."""
    return Path(os.environ.get("RAYREC_CACHE") or Path.home() / ".cache" / "rayrec")


def find_recbole_wheel(cache_dir: Path) -> Path | None:
    """The last-named ``recbole*.whl`` already in ``cache_dir``, or None."""
    wheels = sorted(Path(cache_dir).glob("recbole*.whl"))
    return wheels[-1] if wheels else None


def fetch_recbole_wheel(cache_dir: Path) -> Path:
    """Return a RecBole wheel in ``cache_dir``, downloading it with pip only if none is there."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = find_recbole_wheel(cache_dir)
    if cached is not None:
        return cached
    log.info("downloading %s into %s", RECBOLE_REQUIREMENT, cache_dir)
    command = [
        sys.executable, "-m", "pip", "download", RECBOLE_REQUIREMENT,
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "-d", str(cache_dir),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    wheel = find_recbole_wheel(cache_dir)
    if done.returncode != 0 or wheel is None:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
        )
    return wheel


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, recorded in dataset.json so a dataset names its exact source."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
