"""Build and submit rayrec jobs to any Ray cluster through the Ray Jobs API.

A job is the same ``rayrec`` command a user runs locally, shipped with the repo as the
``working_dir`` so the cluster runs exactly the submitted code. Everything that describes a
submission is built first as a plain :class:`JobSpec` (testable, printable with ``--dry-run``),
then handed to ``ray.job_submission.JobSubmissionClient``.

Authentication: Ray 2.60 clusters use token auth; ``cluster/auth.py`` puts the client in token
mode when a token is available (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``, which a local head writes), so local submissions need no setup.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# Never shipped with working_dir: environments, outputs and data are big and node-specific.
# Patterns are gitignore-style; the leading "/" anchors them to the repo root, so the
# `training/data/` package still ships while the top-level `data/` folder does not.
# Ray would also apply .gitignore; `submit` turns that off so this list alone decides what ships.
WORKING_DIR_EXCLUDES = [
    "/.venv", "/runs", "/data", "/.git", "/build", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis",
]
# The job runs the package from the uploaded working_dir (`python -m`), so a cluster image only
# needs the dependencies, not a `pip install` of this exact commit.
CLI_MODULE = "python -m cluster.cli"
IGNORE_GITIGNORE_ENV = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"
# Set by Ray on the node to the unpacked working_dir while it builds a runtime_env
WORKING_DIR_VAR = "RAY_RUNTIME_ENV_CREATE_WORKING_DIR"


class ConfigError(ValueError):
    """The run config is invalid; raised before anything is submitted."""


@dataclass(frozen=True)
class JobSpec:
    """Everything ``JobSubmissionClient.submit_job`` needs for one rayrec job.

    Args:
        entrypoint: shell command the job runs on the head (in the uploaded working_dir).
        submission_id: readable, unique id, e.g. ``rayrec-train-tiny-20261123T181500Z``.
        runtime_env: Ray runtime_env (working_dir, excludes, env_vars, optional pip).
        metadata: string key/values shown by ``rayrec jobs status`` (git commit, config hash).
        entrypoint_num_cpus: CPUs reserved for the entrypoint process (None: Ray's default, 0).
    """

    entrypoint: str
    submission_id: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None


def submission_id(kind: str, name: str, now: datetime | None = None) -> str:
    """``rayrec-<kind>-<name>-<UTC time>``: sortable, and says what ran without opening it."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "job"
    return f"rayrec-{kind}-{safe}-{stamp}"


def build_runtime_env(
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    working_dir: Path = REPO_ROOT,
) -> dict[str, Any]:
    """The runtime_env every rayrec job gets: the repo as working_dir, minus big local folders."""
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        # the client's commit: the uploaded copy has no .git, and the run's meta.json names it
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAYREC_GIT_COMMIT": git_commit(working_dir), **(env_vars or {})},
    }
    if pip:
        # The constraints file pins torch to the wheel the cluster already has; without it a
        # package that depends on torch would pull a multi-GB CUDA build into the job. It is
        # read from the uploaded working_dir on the node (pip expands the variable Ray sets
        # while it builds the environment), not from this client's checkout.
        constraints = f"-c ${{{WORKING_DIR_VAR}}}/constraints.txt"
        runtime_env["pip"] = {"packages": [constraints, *pip]}
    return runtime_env


def validate_config(config_path: Path, overrides: list[str]) -> dict[str, Any]:
    """Load and validate a run config locally so a broken one fails before submission.

    Uses ``training.config.load_config`` when the training package provides it (pydantic:
    unknown keys and wrong types are reported by name); otherwise checks that the file is a
    YAML mapping and that each ``--set`` is ``key=value``.
    """
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config_path}")
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"--set {override!r}: expected key=value")
    loader = _find_config_loader()
    if loader is not None:
        try:
            loaded = _call_loader(loader, config_path, overrides)
        except Exception as err:  # pydantic ValidationError and friends name the bad key
            message = str(err) if str(config_path) in str(err) else f"{config_path}: {err}"
            raise ConfigError(message) from err
        return _as_dict(loaded)
    try:
        data = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{config_path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def local_data_path_overrides(config_path: Path, overrides: list[str]) -> list[str]:
    """``["data.path=/abs/..."]`` when the config's dataset path is relative, else ``[]``.

    For a head on this machine: ``data/`` is not uploaded with the job, so a relative dataset
    path is resolved against the repo, where ``rayrec train`` run from the checkout finds it.
    """
    data = validate_config(config_path, overrides).get("data")
    path = data.get("path") if isinstance(data, dict) else None
    if not isinstance(path, str) or "://" in path or os.path.isabs(path):
        return []
    return [f"data.path={REPO_ROOT / path}"]


def config_hash(config_path: Path, overrides: list[str]) -> str:
    """Short content hash of the config file plus overrides, recorded in job metadata."""
    digest = hashlib.sha256(config_path.read_bytes())
    for override in overrides:
        digest.update(b"\0" + override.encode())
    return digest.hexdigest()[:12]


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The checked-out commit (``training.runs.git_commit``), or ``unknown`` outside git."""
    from training.runs import git_commit as checkout_commit

    return checkout_commit(repo) or "unknown"


def build_train_job(
    config_path: Path,
    overrides: list[str],
    run_id: str | None,
    runs_dir: str | None,
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    name: str | None = None,
) -> JobSpec:
    """A ``rayrec train`` job for ``config_path`` (validated here first)."""
    validate_config(config_path, overrides)
    relative_config = _inside_repo(config_path)
    parts = [CLI_MODULE, "train", "--config", shlex.quote(relative_config)]
    for override in overrides:
        parts += ["--set", shlex.quote(override)]
    if run_id:
        parts += ["--run-id", shlex.quote(run_id)]
    if runs_dir:
        parts += ["--runs-dir", shlex.quote(runs_dir)]
    return JobSpec(
        entrypoint=" ".join(parts),
        submission_id=name or submission_id("train", config_path.stem),
        runtime_env=build_runtime_env(env_vars, pip),
        metadata={
            "rayrec.kind": "train",
            "rayrec.config": relative_config,
            "rayrec.config_hash": config_hash(config_path, overrides),
            "rayrec.git_commit": git_commit(),
        },
    )


def build_serve_job(
    run: str,
    host: str,
    port: int,
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    name: str | None = None,
    index: str = "auto",
    beam: int | None = None,
) -> JobSpec:
    """A ``rayrec serve --detach`` job: deploys the run's app on the cluster and returns."""
    parts = [CLI_MODULE, "serve", "--run", shlex.quote(run), "--host", shlex.quote(host), "--port", str(port)]
    if index != "auto":
        parts += ["--index", shlex.quote(index)]
    if beam is not None:
        parts += ["--beam", str(beam)]
    parts.append("--detach")
    return JobSpec(
        entrypoint=" ".join(parts),
        submission_id=name or submission_id("serve", Path(run.rstrip("/")).name),
        runtime_env=build_runtime_env(env_vars, pip),
        metadata={"rayrec.kind": "serve", "rayrec.run": run, "rayrec.git_commit": git_commit()},
    )


def build_command_job(
    command: list[str],
    env_vars: dict[str, str] | None = None,
    pip: list[str] | None = None,
    name: str | None = None,
) -> JobSpec:
    """Any command (e.g. ``rayrec data prepare ml-100k``) with the same runtime_env as train/serve."""
    if not command:
        raise ValueError("no command given (put it after `--`)")
    return JobSpec(
        entrypoint=shlex.join(command),
        submission_id=name or submission_id("cmd", Path(command[0]).name),
        runtime_env=build_runtime_env(env_vars, pip),
        metadata={"rayrec.kind": "command", "rayrec.git_commit": git_commit()},
    )


def submit(address: str, spec: JobSpec) -> str:
    """Submit ``spec`` to the cluster whose dashboard/job API is at ``address``; returns the id."""
    from cluster.jobs import client_for

    client = client_for(address)
    # Ray's packager reads this at upload time. An unanchored pattern in .gitignore (`data/`)
    # would otherwise drop packages such as training/data/ from the job.
    previous = os.environ.get(IGNORE_GITIGNORE_ENV)
    os.environ[IGNORE_GITIGNORE_ENV] = "1"
    try:
        return client.submit_job(
            entrypoint=spec.entrypoint,
            submission_id=spec.submission_id,
            runtime_env=spec.runtime_env,
            metadata=spec.metadata,
            entrypoint_num_cpus=spec.entrypoint_num_cpus,
        )
    finally:
        if previous is None:
            os.environ.pop(IGNORE_GITIGNORE_ENV, None)
        else:
            os.environ[IGNORE_GITIGNORE_ENV] = previous


def is_loopback_address(address: str) -> bool:
    """True for ``http://127.0.0.1:8265``-style addresses. Not proof of a head on this machine:
    ``kubectl port-forward`` and ``ray dashboard`` make a remote head loopback too (see
    :func:`head_is_local`)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def head_is_local(address: str) -> bool | None:
    """Whether the cluster's head node runs on this machine, by asking the cluster: the head
    node's IP (Ray's state API) against the addresses this machine's Ray nodes advertise
    (the one Ray picks here, the host name's, loopback). None when the cluster cannot be asked
    (then the caller decides, e.g. from ``--local-head``)."""
    import socket

    from ray.util import get_node_ip_address

    from cluster.auth import enable_client_token_auth

    try:
        enable_client_token_auth()
        from ray.util.state import list_nodes

        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:  # unreachable, refused, old dashboard: not an answer
        return None
    heads = [n for n in nodes if getattr(n, "is_head_node", False)]
    if not heads:
        return None
    try:
        by_name = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        by_name = set()
    mine = {get_node_ip_address(), "127.0.0.1", "::1", *by_name}
    return heads[0].node_ip in mine


def parse_env_vars(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {pair!r}: expected NAME=value")
        env[key] = value
    return env


def _inside_repo(config_path: Path) -> str:
    """The config's path relative to the repo: that is where it is inside the uploaded working_dir."""
    resolved = config_path.resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        raise ConfigError(
            f"{config_path} is outside the repository ({REPO_ROOT}); only files inside it are "
            "uploaded with the job. Copy it under configs/."
        ) from None


def _find_config_loader():
    try:
        module = importlib.import_module("training.config")
    except ModuleNotFoundError as err:
        if err.name in ("training.config", "training"):
            return None
        raise
    return getattr(module, "load_config", None)


def _call_loader(loader, config_path: Path, overrides: list[str]):
    # load_config(path, overrides) is the expected shape; accept a loader without overrides too.
    if len(inspect.signature(loader).parameters) >= 2:
        return loader(config_path, overrides)
    if overrides:
        raise ConfigError("this training.config.load_config takes no --set overrides")
    return loader(config_path)


def _as_dict(loaded: Any) -> dict[str, Any]:
    if hasattr(loaded, "model_dump"):
        return loaded.model_dump()
    if isinstance(loaded, dict):
        return loaded
    return {"config": loaded}

