"""Where checkpoints and datasets live: one place that turns a storage URI into a filesystem.

Runs and datasets are addressed by URI so the same config works on a laptop, a Ray cluster with
a shared mount, and a cloud bucket:

- ``local:///abs/path`` or a plain path (``runs/``, ``/mnt/shared/runs``): this machine's
  filesystem. ``local://`` says explicitly "node-local"; a plain path may be a shared mount.
- ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``: whatever
  ``pyarrow.fs.FileSystem.from_uri`` supports (credentials come from the usual environment).

A multi-node run needs every node to see the same files, so :func:`check_shared_storage`
refuses a node-local path there before any worker starts, instead of each node silently
writing its own partial checkpoint.

Example:
    >>> fs, path = resolve_uri("local:///tmp/runs")
    >>> type(fs).__name__, path
    ('LocalFileSystem', '/tmp/runs')
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

LOCAL_SCHEME = "local"

# Filesystem types (as /proc/mounts names them) that several machines can mount at once.
SHARED_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "cephfs",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.gcsfuse",
        "fuse.s3fs",
        "fuse.goofys",
        "fuse.juicefs",
        "fuse.sshfs",
        "9p",  # shared folders of VMs and devcontainers
        "virtiofs",
    }
)


class SharedStorageError(ValueError):
    """A multi-node run was pointed at storage only one node can see."""


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts that matters here: where it is mounted and its type."""

    mount_point: str
    fs_type: str


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a storage URI.

    Plain and ``local://`` paths become absolute paths on a ``LocalFileSystem`` (resolved
    against the current directory, so a job and its driver agree on them); every other scheme
    goes to ``pyarrow.fs.FileSystem.from_uri``, which owns the scheme table and credentials.
    """
    if not uri:
        raise ValueError("empty storage URI")
    parsed = urlparse(uri)
    if parsed.scheme == LOCAL_SCHEME:
        local_path = uri[len(LOCAL_SCHEME) + len("://") :]
        return pafs.LocalFileSystem(), os.path.abspath(local_path or "/")
    if parsed.scheme in ("", "file") or _looks_like_windows_drive(parsed.scheme):
        local_path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(local_path)
    return pafs.FileSystem.from_uri(uri)


def is_node_local(uri: str, mounts: list[Mount] | None = None) -> bool:
    """True when ``uri`` names storage that other nodes cannot see.

    ``local://`` is node-local by definition; a plain path is node-local unless it lies on a
    network/cluster filesystem (see ``SHARED_FS_TYPES``); remote schemes are shared.
    """
    parsed = urlparse(uri)
    if parsed.scheme == LOCAL_SCHEME:
        return True
    filesystem, path = resolve_uri(uri)
    if not isinstance(filesystem, pafs.LocalFileSystem):
        return False
    mount = mount_of(path, mounts if mounts is not None else read_mounts())
    return mount is None or mount.fs_type not in SHARED_FS_TYPES


def check_shared_storage(uri: str, num_nodes: int, mounts: list[Mount] | None = None) -> None:
    """Raise :class:`SharedStorageError` if a run on ``num_nodes`` nodes would use node-local storage.

    Args:
        uri: where the run writes checkpoints or reads data.
        num_nodes: how many machines take part (1 = everything on one node: any path works).
        mounts: the mount table to judge plain paths by (default: this machine's /proc/mounts).
    """
    if num_nodes <= 1 or not is_node_local(uri, mounts):
        return
    _, path = resolve_uri(uri)
    mount = mount_of(path, mounts if mounts is not None else read_mounts())
    where = f"{mount.fs_type} mounted at {mount.mount_point}" if mount else "this node"
    raise SharedStorageError(
        f"storage {uri!r} resolves to {path} on {where}, which only this node can see, but the "
        f"run spans {num_nodes} nodes. Use a bucket (s3://..., gs://...) or a path on a shared "
        f"mount ({', '.join(sorted(SHARED_FS_TYPES)[:6])}, ...)."
    )


def read_mounts(proc_mounts: str = "/proc/mounts") -> list[Mount]:
    """Parse the mount table (Linux); empty on systems without /proc."""
    try:
        text = Path(proc_mounts).read_text()
    except OSError:
        return []
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            # /proc/mounts escapes spaces in mount points as \040.
            mounts.append(Mount(mount_point=fields[1].replace("\\040", " "), fs_type=fields[2]))
    return mounts


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds ``path``: the longest mount point that is a prefix of it."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        inside = path == point or path.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) > len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def _looks_like_windows_drive(scheme: str) -> bool:
    # urlparse("C:\\runs") reports scheme "c"; such a path is local, not a URI.
    return len(scheme) == 1
