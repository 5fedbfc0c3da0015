"""Fail points: disarmed they do nothing; armed they SIGKILL the process once per marker folder.

The firing cases run in a subprocess, so the SIGKILL takes that process and not pytest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO
from training.failpoints import DIR_ENV, ENV, parse, worker_env

# a "worker" passing the fail point twice, the way a save passes it once per epoch
_PASS = (
    "from training.failpoints import failpoint\n"
    "for epoch in (0, 1):\n"
    "    failpoint('checkpoint.upload', rank=0, epoch=epoch)\n"
    "    print('passed', epoch, flush=True)\n"
)


def _worker(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in (ENV, DIR_ENV)}
    return subprocess.run([sys.executable, "-c", _PASS], env={**clean, "PYTHONPATH": str(REPO), **env},
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip


def test_disarmed_failpoint_is_a_no_op(tmp_path):
    proc = _worker({})
    assert proc.returncode == 0 and proc.stdout.split("\n")[:2] == ["passed 0", "passed 1"]
    # armed for another context: still a no-op, and nothing is claimed
    proc = _worker({ENV: "checkpoint.upload@rank=1", DIR_ENV: str(tmp_path)})
    assert proc.returncode == 0 and "passed 1" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_armed_failpoint_kills_the_process_once(tmp_path):
    env = {ENV: "checkpoint.upload@rank=0,epoch=1", DIR_ENV: str(tmp_path / "markers")}
    first = _worker(env)
    assert first.returncode == -signal.SIGKILL  # died at epoch 1, after passing epoch 0
    assert first.stdout.split() == ["passed", "0"]
    marker = tmp_path / "markers" / "checkpoint.upload@rank=0,epoch=1.fired"
    record = json.loads(marker.read_text())
    assert record["context"] == {"rank": 0, "epoch": 1}
    # the restarted process finds the marker and passes
    second = _worker(env)
    assert second.returncode == 0 and "passed 1" in second.stdout
    assert record == json.loads(marker.read_text())


def test_armed_failpoint_without_a_marker_folder_refuses_to_fire():
    proc = _worker({ENV: "checkpoint.upload@epoch=0"})
    assert proc.returncode == 1 and f"{DIR_ENV} is not set" in proc.stderr


def test_spec_syntax():
    rules = parse(" checkpoint.upload@rank=0,epoch=1 ; checkpoint.after_shards ;checkpoint.upload@rank=1")
    assert [r.conditions for r in rules["checkpoint.upload"]] == [{"rank": "0", "epoch": "1"}, {"rank": "1"}]
    assert rules["checkpoint.after_shards"][0].conditions == {}
    assert rules["checkpoint.after_shards"][0].matches({"rank": 3})
    assert not rules["checkpoint.upload"][0].matches({"rank": 0})  # a missing key never matches
    assert parse("") == {}
    for bad in ("checkpoint.upload@rank", "checkpoint/upload", "a@rank=0/1"):
        with pytest.raises(ValueError, match=ENV):
            parse(bad)


def test_worker_env_forwards_the_drivers_spec(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(DIR_ENV, raising=False)
    assert worker_env(tmp_path) == {}
    monkeypatch.setenv(ENV, "checkpoint.upload@rank=0")
    assert worker_env(tmp_path) == {ENV: "checkpoint.upload@rank=0", DIR_ENV: str(tmp_path)}
    monkeypatch.setenv(ENV, "checkpoint.upload@rank")
    with pytest.raises(ValueError):
        worker_env(tmp_path)
