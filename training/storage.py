"""Where a path crosses a node boundary: local folders and object-storage URIs, one way in.

Every path a job, a replica or the CLI hands to another node (``data.path``, ``runs_dir``,
a run folder given to ``rayrec serve``, the feedback archive) goes through this module:

- a local path (``runs``, ``/mnt/shared/runs``, ``file:///mnt/shared/runs``) is used in place,
  as before: on a cluster it must be a mount every node shares;
- a URI (``s3://bucket/runs``, ``gs://…``, any scheme ``pyarrow.fs`` knows) is read and written
  through ``pyarrow.fs``. Code that wants a folder on disk (torch, Parquet readers, numba
  views) gets a *node-local mirror* under :func:`cache_root`, filled by :func:`local_path`;
  what it writes goes back with :func:`upload`.

S3-compatible stores other than AWS (MinIO, Ceph, moto, GCS's S3 endpoint) are reached with
the standard variables every S3 client reads: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
:func:`storage_env` names the ones set here, so a job forwards them to its workers.

Why a mirror rather than reading every file through ``pyarrow.fs``: the readers downstream
(``torch.distributed.checkpoint``, numpy memory maps of an index, pandas/pyarrow on a folder)
want a POSIX folder, and a serving replica reads its index once at start; a copy per node,
refreshed when the run changes, costs one download and keeps those readers as they are.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

CACHE_ENV = "RAYREC_CACHE_DIR"
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


class StorageError(RuntimeError):
    """A URI that cannot be reached or read; the message names it."""


class SharedStorageError(StorageError):
    """A local path that the process which wrote it can see and this node cannot: a multi-node
    run pointed at node-local storage."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is an object-storage URI (any scheme but ``file``)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def normalize(path: str | Path) -> str:
    """The canonical spelling: an absolute local path (``file://`` dropped), or the URI without
    a trailing ``/``. Relative local paths resolve against the working directory, here."""
    text = str(path)
    if is_remote(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = urlparse(text).path
    return str(Path(text).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI."""
    text = str(base).rstrip("/") if is_remote(base) else normalize(base)
    for part in parts:
        text = f"{text.rstrip('/')}/{part.strip('/')}" if is_remote(text) else str(Path(text, part))
    return text


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``: what ``pyarrow.fs`` calls, and Ray Train's
    ``RunConfig(storage_filesystem=..., storage_path=...)`` takes.

    ``s3://`` URIs honour ``AWS_ENDPOINT_URL`` (``http://host:port`` for a store without TLS).
    """
    text = str(path)
    if not is_remote(text):
        return pafs.LocalFileSystem(), normalize(text)
    parsed = urlparse(text)
    if parsed.scheme in ("s3", "s3a"):
        return _s3_filesystem(), (parsed.netloc + parsed.path).rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for unknown schemes
        raise StorageError(f"{text}: not a storage URI pyarrow.fs can open ({err})") from None


def _s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    return pafs.S3FileSystem(**kwargs)


def storage_env() -> dict[str, str]:
    """The object-storage variables set in this process, to forward to workers and replicas."""
    return {name: os.environ[name] for name in STORAGE_ENV_VARS if os.environ.get(name)}


def cache_root() -> Path:
    """This node's folder of mirrors (``$RAYREC_CACHE_DIR``, else ``~/.cache/rayrec/storage``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rayrec" / "storage")


def mirror_path(uri: str) -> Path:
    """Where :func:`local_path` keeps ``uri`` on this node: ``<cache>/<scheme>/<bucket>/<key>``."""
    parsed = urlparse(normalize(uri))
    return cache_root() / parsed.scheme / parsed.netloc / parsed.path.strip("/")


def exists(path: str | Path) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_bytes(path: str | Path) -> bytes:
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a whole file (local: temp + rename, so a reader never sees half of it; object
    stores publish an object whole on close)."""
    fs, inner = resolve(path)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(inner).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(inner + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, inner)
        return
    with fs.open_output_stream(inner) as f:
        f.write(data)


def list_dir(path: str | Path) -> list[pafs.FileInfo]:
    """The entries directly under ``path`` (empty when it does not exist)."""
    fs, inner = resolve(path)
    return fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))


def delete_dir(path: str | Path) -> None:
    fs, inner = resolve(path)
    fs.delete_dir(inner)


def local_path(path: str | Path, skip: Optional[Callable[[str], bool]] = None) -> Path:
    """A folder or file on this node with the content of ``path``.

    Local paths are returned as they are. A URI is mirrored into :func:`mirror_path`: files whose
    size and modification time match the mirror's are not fetched again, so calling this on a
    run that moved on costs only what changed. ``skip(relative path)`` leaves entries out (a
    run's checkpoints, which Ray Train fetches itself). Concurrent callers on one node (two
    replicas starting together) take turns on a lock file.

    Raises:
        FileNotFoundError: naming the URI, when nothing is there.
    """
    if not is_remote(path):
        return Path(normalize(path))
    uri = normalize(path)
    fs, inner = resolve(uri)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: not found in object storage")
    target = mirror_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.{hashlib.sha1(uri.encode()).hexdigest()[:8]}.lock"
    with open(lock, "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if info.type == pafs.FileType.File:
            _fetch(fs, info, target)
            return target
        for entry in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            relative = entry.path[len(inner):].lstrip("/")
            if skip is not None and skip(relative):
                continue
            if entry.type == pafs.FileType.File:
                _fetch(fs, entry, target / relative)
        target.mkdir(parents=True, exist_ok=True)
    return target


def _fetch(fs: pafs.FileSystem, info: pafs.FileInfo, target: Path) -> None:
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    if target.is_file() and target.stat().st_size == info.size and mtime is not None:
        if abs(target.stat().st_mtime - mtime) < 1e-3:
            return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with fs.open_input_stream(info.path) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, target)


def upload(local: str | Path, path: str | Path) -> None:
    """Copy a local file or folder (recursively) to ``path``; a local ``path`` is copied too."""
    local = Path(local)
    fs, inner = resolve(path)
    if local.is_dir():
        fs.create_dir(inner, recursive=True)
        pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    elif local.is_file():
        if isinstance(fs, pafs.LocalFileSystem):
            write_bytes(inner, local.read_bytes())
        else:
            pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    else:
        raise FileNotFoundError(f"{local}: nothing to upload")
