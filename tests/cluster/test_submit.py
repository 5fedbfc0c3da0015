"""What a submission carries (entrypoint, runtime_env, id, metadata), checked without a cluster."""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime, timezone
from pathlib import Path

import pytest

from cluster.submit import (
    REPO_ROOT,
    ConfigError,
    build_command_job,
    build_serve_job,
    build_train_job,
    config_hash,
    is_loopback_address,
    local_data_path_overrides,
    submission_id,
    validate_config,
)

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def test_submission_id_is_readable_and_sortable():
    now = datetime(2026, 11, 23, 18, 5, 9, tzinfo=timezone.utc)
    assert submission_id("train", "tiny", now) == "rayrec-train-tiny-20261123T180509Z"
    assert submission_id("cmd", "my config!", now) == "rayrec-cmd-my-config-20261123T180509Z"


def test_train_job_runs_the_cli_from_the_uploaded_repo():
    spec = build_train_job(TINY, ["train.epochs=1"], run_id="r1", runs_dir="/shared/runs")
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "cluster.cli", "train", "--config", "configs/tiny.yaml",
        "--set", "train.epochs=1", "--run-id", "r1", "--runs-dir", "/shared/runs",
    ]
    assert spec.submission_id.startswith("rayrec-train-tiny-")
    env = spec.runtime_env
    assert env["working_dir"] == str(REPO_ROOT)
    assert {"/.venv", "/runs", "/data", "/.git"} <= set(env["excludes"])
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "pip" not in env
    assert spec.metadata["rayrec.config"] == "configs/tiny.yaml"
    assert spec.metadata["rayrec.config_hash"] == config_hash(TINY, ["train.epochs=1"]) != config_hash(TINY, [])
    assert spec.metadata["rayrec.git_commit"]


def test_pip_packages_are_constrained_and_env_vars_passed():
    spec = build_command_job(["rayrec", "data", "prepare", "ml-100k"], env_vars={"A": "1"}, pip=["tabulate"])
    # the constraints come from the uploaded working_dir on the node, not this client's path
    assert spec.runtime_env["pip"] == {"packages": ["-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt", "tabulate"]}
    assert str(REPO_ROOT) not in json.dumps(spec.runtime_env["pip"])
    assert spec.runtime_env["env_vars"]["A"] == "1"
    assert spec.entrypoint == "rayrec data prepare ml-100k"


def test_serve_job_detaches_and_binds_where_asked():
    spec = build_serve_job("/shared/runs/r1", host="127.0.0.1", port=8320)
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "cluster.cli", "serve", "--run", "/shared/runs/r1", "--host", "127.0.0.1", "--port", "8320", "--detach",
    ]
    assert spec.submission_id.startswith("rayrec-serve-r1-")
    learned = build_serve_job("/shared/runs/r1", host="127.0.0.1", port=8320, index="mfli", beam=32)
    assert shlex.split(learned.entrypoint)[-5:] == ["--index", "mfli", "--beam", "32", "--detach"]


def test_config_is_validated_before_anything_is_built(tmp_path: Path):
    validate_config(TINY, ["train.epochs=1"])
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY.read_text().replace("epochs:", "epochz:"))
    with pytest.raises(ConfigError, match="epochz"):
        build_train_job(typo, [], None, None)
    with pytest.raises(ConfigError, match="expected key=value"):
        validate_config(TINY, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        validate_config(tmp_path / "missing.yaml", [])


def test_config_outside_the_repo_is_refused(tmp_path: Path):
    outside = tmp_path / "tiny.yaml"
    outside.write_text(TINY.read_text())
    with pytest.raises(ConfigError, match="outside the repository"):
        build_train_job(outside, [], None, None)


def test_loopback_addresses():
    assert is_loopback_address("http://127.0.0.1:8265")
    assert is_loopback_address("localhost:8265")
    assert not is_loopback_address("http://ray-head.example.com:8265")


def test_pip_reads_the_constraints_from_the_working_dir_ray_names(tmp_path: Path):
    """What Ray's pip plugin does on the node: the packages go into a requirements file and pip
    runs with RAY_RUNTIME_ENV_CREATE_WORKING_DIR set; pip expands it and applies the file."""
    import subprocess
    import sys

    import yaml as installed

    spec = build_command_job(["true"], pip=["pyyaml"])
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(spec.runtime_env["pip"]["packages"]) + "\n")
    working_dir = tmp_path / "unpacked-working-dir"
    working_dir.mkdir()

    def pip(constraint: str) -> subprocess.CompletedProcess:
        (working_dir / "constraints.txt").write_text(constraint + "\n")
        env = {**os.environ, "RAY_RUNTIME_ENV_CREATE_WORKING_DIR": str(working_dir), "PIP_CONSTRAINT": ""}
        return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", str(requirements)],
                              env=env, capture_output=True, text=True, timeout=120)

    assert pip(f"pyyaml=={installed.__version__}").returncode == 0
    refused = pip("pyyaml==0.0.1")  # the constraint is read: nothing satisfies it offline
    assert refused.returncode != 0 and "ResolutionImpossible" in refused.stderr


def test_dry_run_prints_the_submission_without_a_cluster(capsys):
    from cluster.cli import main

    # an address nobody answers on counts as a remote head: paths are left as written
    returncode = main(["submit", "train", "--config", str(TINY), "--address", "http://127.0.0.1:1", "--dry-run"])
    assert returncode == 0, capsys.readouterr().err
    spec = json.loads(capsys.readouterr().out)
    assert "--runs-dir" not in spec["entrypoint"] and "data.path" not in spec["entrypoint"]
    # --local-head: the run folder and the dataset stay in this checkout (runs/ and data/ are
    # not uploaded), so both become absolute.
    returncode = main(["submit", "train", "--config", str(TINY), "--address", "http://127.0.0.1:1", "--dry-run", "--local-head"])
    assert returncode == 0, capsys.readouterr().err
    spec = json.loads(capsys.readouterr().out)
    assert spec["entrypoint"].endswith(f"--runs-dir {REPO_ROOT / 'runs'}")
    assert f"--set data.path={REPO_ROOT / 'data' / 'ml-100k'}" in spec["entrypoint"]


def test_local_data_path_is_left_alone_when_absolute():
    assert local_data_path_overrides(TINY, ["data.path=/mnt/ml-100k"]) == []
    assert local_data_path_overrides(TINY, []) == [f"data.path={REPO_ROOT / 'data' / 'ml-100k'}"]
