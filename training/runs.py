"""The run folder: the one place that knows the paths under ``runs/<run-id>/``.

Layout (see docs/architecture.md)::

    runs/<run-id>/
      config.yaml        resolved config
      meta.json          git commit, seed, versions, world size, created
      metrics.jsonl      one JSON object per line: epoch reports, run events ("event": "resumed", ...)
                         and rank 0's step progress ("event": "progress" / "stage", training.progress)
      checkpoint_*/      Ray Train checkpoints (sharded torch.distributed.checkpoint state)
      failpoints/        markers of fired fail points (tests; see training/failpoints.py)
      index/             serving artifact (items/users/popularity/seen Parquet, index.json)
      eval.json          final test metrics
      tensorboard/       the metrics and the config as TensorBoard event files (training.tracking)

Ray Train owns the ``checkpoint_*`` folders (``RunConfig(storage_path=runs_dir, name=run_id)``),
so re-running with the same run id resumes from the latest one.

A run lives where ``runs_dir`` says: a local folder (a shared mount on a cluster) or an
object-storage URI (``s3://bucket/runs``; ``training.storage``). For a URI, :attr:`RunDir.path`
is this node's mirror of the run: code reads and writes files there as for a local run,
:meth:`RunDir.pull` refreshes it and :meth:`RunDir.push` publishes what this process wrote
(``metrics.jsonl`` and JSON records are pushed as they are written; a job pushes its exports).
Checkpoints never go through the mirror: Ray Train writes and fetches them itself.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel

from training import storage
from training.config import dump_config
from training.tracking import TENSORBOARD_DIR, write_scalars, write_text

# never mirrored: Ray Train moves checkpoints itself; heartbeats and fail point markers are
# this node's own (a restarted worker writes new ones)
_NODE_LOCAL = ("checkpoint_", "workers", "failpoints")
# metrics.jsonl records that only feed the driver's progress bars (training.progress)
PROGRESS_EVENTS = ("progress", "stage")


def _node_local(relative: str) -> bool:
    return relative.startswith(_NODE_LOCAL) or relative.endswith(".tmp")


def new_run_id(stem: str) -> str:
    """``<stem>-<UTC yyyymmdd-HHMMSS>``: readable, sortable, unique per second."""
    return f"{stem}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def continued_run_id(run_id: str) -> str:
    """The run id of the next version of ``run_id`` (``rayrec train --continue``): ``<base>-c<n+1>``
    with n the version ``run_id`` already carries (0 for a run trained from a config), so
    ``tiny`` → ``tiny-c0001`` → ``tiny-c0002``. Deterministic, so a rerun of an interrupted
    continuation finds its own folder (and Ray Train its checkpoints) again."""
    import re

    match = re.fullmatch(r"(.+)-c(\d{4,})", run_id)
    base, version = (match.group(1), int(match.group(2))) if match else (run_id, 0)
    return f"{base}-c{version + 1:04d}"


def git_commit(repo: Optional[Path] = None) -> Optional[str]:
    """The checkout's commit (with ``-dirty`` when it has changes), or None outside git.

    A job on a cluster runs from a copy of the working tree without ``.git``: the submitter
    records the client's commit in ``RAYREC_GIT_COMMIT`` (``cluster.submit``), read first.
    """
    if os.environ.get("RAYREC_GIT_COMMIT"):
        return os.environ["RAYREC_GIT_COMMIT"]
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchrec", "fbgemm_gpu", "ray", "pyarrow"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            pass
    return versions


@dataclass(frozen=True)
class RunDir:
    """Paths of one run folder. Construct with :func:`create_run`, :meth:`open` or ``RunDir(Path(...))``.

    Args:
        path: where this process reads and writes the run's files: the run folder itself, or
            for a run in object storage this node's mirror of it.
        uri: the run's URI when it lives in object storage (None for a local run).
    """

    path: Path
    uri: Optional[str] = None

    @classmethod
    def open(cls, location: str | Path) -> "RunDir":
        """The run at ``location`` (a local folder or a URI); nothing is fetched yet."""
        if storage.is_remote(location):
            uri = storage.normalize(location)
            return cls(storage.mirror_path(uri), uri)
        return cls(Path(storage.normalize(location)))

    @property
    def location(self) -> str:
        """What another node opens this run by: the URI, or the absolute local folder."""
        return self.uri or str(self.path)

    @property
    def run_id(self) -> str:
        return self.path.name

    def pull(self) -> "RunDir":
        """Refresh this node's mirror from object storage (checkpoints left out); no-op locally."""
        if self.uri is not None and storage.exists(self.uri):
            storage.local_path(self.uri, skip=_node_local)
        return self

    def push(self, *names: str) -> None:
        """Publish files or folders of the mirror (relative names; none: everything but
        checkpoints, heartbeats and fail point markers) to object storage; no-op locally."""
        if self.uri is None:
            return
        if not names:
            names = tuple(p.name for p in self.path.iterdir() if not _node_local(p.name)) if self.path.is_dir() else ()
        for name in names:
            if (self.path / name).exists():
                storage.upload(self.path / name, storage.join(self.uri, name))

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def index_dir(self) -> Path:
        return self.path / "index"

    @property
    def mfli_index_dir(self) -> Path:
        """MFLI's learned index (codebooks, codes, posting lists) inside ``index/``."""
        return self.index_dir / "mfli"

    @property
    def ranker_dir(self) -> Path:
        """The ranker's serving export (unsharded state_dict, config, feature tables)."""
        return self.path / "ranker"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.json"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard event files of the metrics (``tensorboard --logdir runs``)."""
        return self.path / TENSORBOARD_DIR

    @property
    def workers_dir(self) -> Path:
        return self.path / "workers"

    @property
    def failpoints_dir(self) -> Path:
        """Markers of the fail points that fired in this run (``RAYREC_FAILPOINTS``)."""
        return self.path / "failpoints"

    def write_heartbeat(self, rank: int, **status: Any) -> None:
        """``workers/rank-<r>.json``: this worker's pid and progress (atomic; read by ops and tests)."""
        self.workers_dir.mkdir(exist_ok=True)
        self.write_json(self.workers_dir / f"rank-{rank}.json", {"rank": rank, "pid": os.getpid(), **status})

    def read_heartbeat(self, rank: int) -> Optional[dict[str, Any]]:
        path = self.workers_dir / f"rank-{rank}.json"
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def checkpoints(self) -> list[Path | str]:
        """Committed checkpoint folders (local paths or URIs), oldest first (partial ones from
        an interrupted save are left out: see ``training.checkpoint.is_complete``)."""
        from training.checkpoint import is_complete

        return [p for p in self.checkpoint_folders() if is_complete(p)]

    def checkpoint_folders(self) -> list[Path | str]:
        """Every ``checkpoint_*`` folder, committed or not, oldest first: paths for a local run,
        URIs for a run in object storage (where Ray Train writes them)."""
        names = sorted(
            info.base_name
            for info in storage.list_dir(self.location)
            if info.type == storage.pafs.FileType.Directory and info.base_name.startswith("checkpoint_")
        )
        if self.uri is None:
            return [self.path / name for name in names]
        return [storage.join(self.uri, name) for name in names]

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (flushed and fsynced: a crash loses at most this line), and
        its scalars to the TensorBoard event files; publish them when the run is in object
        storage (the event files with each epoch report, not with every progress record).

        The one place that writes a run's metrics."""
        line = json.dumps(record, default=float) + "\n"
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        tracked = write_scalars(self.tensorboard_dir, record)
        self.push(self.metrics_path.name)
        if tracked and record.get("event") not in PROGRESS_EVENTS:
            self.push(TENSORBOARD_DIR)

    def read_metrics(self, progress: bool = False) -> Iterator[dict[str, Any]]:
        """The epoch reports and run events in order; with ``progress``, also rank 0's step
        progress and stage records (what the driver's progress bars draw)."""
        if not self.metrics_path.exists():
            return iter(())
        records = (json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip())
        return (r for r in records if progress or r.get("event") not in PROGRESS_EVENTS)

    def write_json(self, path: Path, payload: dict[str, Any]) -> None:
        """Write JSON atomically (temp file + rename); a file at the top of a run in object
        storage is published too (heartbeats, under ``workers/``, stay on this node)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
        os.replace(tmp, path)
        if path == self.eval_path and write_scalars(self.tensorboard_dir, {"event": "test", **payload}):
            self.push(TENSORBOARD_DIR)
        if path.parent == self.path:
            self.push(path.name)

    def read_json(self, path: Path) -> dict[str, Any]:
        return json.loads(path.read_text())

    def read_published(self, name: str) -> Optional[str]:
        """The text of the run's file ``name`` (``meta.json``, ``eval.json``, ...) where the run
        lives, without mirroring the run; None when it is not there."""
        try:
            return storage.read_bytes(storage.join(self.location, name)).decode()
        except (FileNotFoundError, OSError):
            return None


def run_dir(runs_dir: str | Path, run_id: str) -> RunDir:
    """The folder of run ``run_id`` under ``runs_dir`` (where Ray Train writes its checkpoints):
    a local folder or an object-storage URI."""
    return RunDir.open(storage.join(storage.normalize(runs_dir), run_id))


def list_runs(runs_dir: str | Path) -> list[RunDir]:
    """The runs under ``runs_dir`` (a folder or a URI): its sub-folders that hold a meta.json,
    in name order (``<config-stem>-<UTC time>``: by config, then oldest first)."""
    runs = []
    for info in storage.list_dir(storage.normalize(runs_dir)):
        if info.type == storage.pafs.FileType.Directory:
            run = run_dir(runs_dir, info.base_name)
            if storage.exists(storage.join(run.location, run.meta_path.name)):
                runs.append(run)
    return sorted(runs, key=lambda run: run.run_id)


def create_run(cfg: BaseModel, runs_dir: str | Path, run_id: str, world_size: int) -> RunDir:
    """Make (or reopen, to resume) ``runs_dir/run_id`` and write config.yaml and meta.json."""
    run = run_dir(runs_dir, run_id).pull()
    run.path.mkdir(parents=True, exist_ok=True)
    config = dump_config(cfg)
    run.config_path.write_text(
        f"# resolved config of run {run_id}; rerun with: rayrec train --config {run.location}/config.yaml\n"
        + config
    )
    write_text(run.tensorboard_dir, "config", config)
    run.push(run.config_path.name, TENSORBOARD_DIR)
    meta = {
        "run_id": run_id,
        "kind": getattr(cfg, "kind", None),
        "seed": getattr(cfg, "seed", None),
        "git_commit": git_commit(),
        "world_size": world_size,
        "versions": library_versions(),
        "host": platform.node(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if run.meta_path.exists():  # resuming: keep the first creation time, record the restart
        previous = run.read_json(run.meta_path)
        meta["created"] = previous.get("created", meta["created"])
        meta["restarts"] = previous.get("restarts", 0) + 1
    run.write_json(run.meta_path, meta)
    return run
