"""Storage URIs resolve in one place, and multi-node runs refuse node-local paths."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from cluster.storage import (
    Mount,
    SharedStorageError,
    check_shared_storage,
    is_node_local,
    mount_of,
    read_mounts,
    resolve_uri,
)

MOUNTS = [Mount("/", "ext4"), Mount("/mnt/shared", "nfs4"), Mount("/mnt/shared/scratch", "tmpfs"), Mount("/gcs", "fuse.gcsfuse")]


def test_plain_and_local_paths_resolve_to_absolute_local_paths(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("runs/exp", f"local://{tmp_path}/runs/exp", f"file://{tmp_path}/runs/exp"):
        filesystem, path = resolve_uri(uri)
        assert isinstance(filesystem, pafs.LocalFileSystem)
        assert path == str(tmp_path / "runs" / "exp")


def test_resolved_filesystem_reads_and_writes(tmp_path: Path):
    filesystem, path = resolve_uri(f"local://{tmp_path}/data")
    filesystem.create_dir(path)
    pq.write_table(pa.table({"item_id": pa.array([1, 2], pa.int64())}), f"{path}/items.parquet", filesystem=filesystem)
    assert pq.read_table(f"{tmp_path}/data/items.parquet").column("item_id").to_pylist() == [1, 2]


def test_bucket_uris_go_to_pyarrow():
    filesystem, path = resolve_uri("s3://bucket/runs/exp?region=us-east-1&endpoint_override=127.0.0.1:9")
    assert filesystem.type_name == "s3" and path == "bucket/runs/exp"
    filesystem, path = resolve_uri("mock:///runs/exp")
    assert not isinstance(filesystem, pafs.LocalFileSystem) and path == "runs/exp"


def test_empty_uri_is_an_error():
    with pytest.raises(ValueError):
        resolve_uri("")


def test_mount_of_picks_the_longest_matching_mount_point():
    assert mount_of("/mnt/shared/runs", MOUNTS).fs_type == "nfs4"
    assert mount_of("/mnt/shared/scratch/x", MOUNTS).fs_type == "tmpfs"
    assert mount_of("/mnt/sharedother", MOUNTS).fs_type == "ext4"


def test_node_local_judgement():
    assert is_node_local("local:///mnt/shared/runs", MOUNTS)  # local:// says so explicitly
    assert is_node_local("/tmp/runs", MOUNTS)
    assert not is_node_local("/mnt/shared/runs", MOUNTS)
    assert not is_node_local("/gcs/bucket/runs", MOUNTS)
    assert not is_node_local("s3://bucket/runs?region=us-east-1", MOUNTS)


def test_single_node_runs_accept_any_path():
    check_shared_storage("/tmp/runs", num_nodes=1, mounts=MOUNTS)
    check_shared_storage("local:///tmp/runs", num_nodes=1, mounts=MOUNTS)


def test_multi_node_run_on_a_node_local_path_fails_clearly():
    with pytest.raises(SharedStorageError, match=r"'/tmp/runs' resolves to /tmp/runs on ext4 mounted at /.*spans 2 nodes"):
        check_shared_storage("/tmp/runs", num_nodes=2, mounts=MOUNTS)
    with pytest.raises(SharedStorageError, match="spans 3 nodes"):
        check_shared_storage("local:///mnt/shared/runs", num_nodes=3, mounts=MOUNTS)
    check_shared_storage("/mnt/shared/runs", num_nodes=2, mounts=MOUNTS)
    check_shared_storage("s3://bucket/runs?region=us-east-1", num_nodes=8, mounts=MOUNTS)


def test_this_machines_mount_table_is_read():
    # The real /proc/mounts: the repo's own folder is on some mount, and /tmp is not shared here.
    assert mount_of(os.getcwd(), read_mounts()) is not None
    with pytest.raises(SharedStorageError):
        check_shared_storage("/tmp/rayrec-runs", num_nodes=2)
