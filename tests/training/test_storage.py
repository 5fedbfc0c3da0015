"""training.storage and RunDir on each scheme: a local folder, ``file://`` and ``s3://`` (a real
S3-compatible server on loopback). Same calls, same results; a URI is mirrored per node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.s3_server import s3_server


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "node-cache"
    monkeypatch.setenv("RAYREC_CACHE_DIR", str(folder))
    return folder


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["local", "file", "s3"])
def location(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store" / "runs")
    if request.param == "file":
        return f"file://{tmp_path}/store/runs"
    request.getfixturevalue("s3")
    return f"s3://rayrec/{request.node.name.replace('[', '-').rstrip(']')}/runs"


def test_upload_then_local_path_round_trips_a_folder(location, cache, tmp_path):
    from training import storage

    src = tmp_path / "src"
    (src / "index").mkdir(parents=True)
    (src / "index" / "items.txt").write_text("1 2 3")
    (src / "eval.json").write_text('{"recall": 0.5}')
    target = storage.join(location, "r1")
    storage.upload(src, target)
    assert storage.exists(target) and not storage.exists(storage.join(location, "missing"))
    local = storage.local_path(target)
    assert _tree(local) == {"eval.json": '{"recall": 0.5}', "index/items.txt": "1 2 3"}
    assert json.loads(storage.read_bytes(storage.join(target, "eval.json"))) == {"recall": 0.5}
    # a URI lands in this node's cache; a local path is used in place
    assert local.is_relative_to(cache) == storage.is_remote(location)


def test_mirror_refetches_only_what_changed_and_skips_what_it_is_told(location, cache, tmp_path):
    from training import storage

    target = storage.join(location, "r2")
    storage.write_bytes(storage.join(target, "a.txt"), b"one")
    storage.write_bytes(storage.join(target, "checkpoint_000000", "x.distcp"), b"shard")
    local = storage.local_path(target, skip=lambda rel: rel.startswith("checkpoint_"))
    if storage.is_remote(location):
        assert not (local / "checkpoint_000000").exists()
    storage.write_bytes(storage.join(target, "a.txt"), b"two!")
    assert (storage.local_path(target) / "a.txt").read_text() == "two!"


def test_run_dir_writes_reach_the_store_and_another_node_reads_them(location, cache, tmp_path, monkeypatch):
    from training.runs import RunDir, run_dir

    run = run_dir(location, "run-a")
    run.path.mkdir(parents=True, exist_ok=True)
    run.append_metrics({"epoch": 0, "loss": 1.0})
    run.write_json(run.eval_path, {"test/recall@10": 0.1})
    run.index_dir.mkdir(exist_ok=True)
    (run.index_dir / "index.json").write_text("{}")
    run.write_heartbeat(0, epoch=0)  # node-local: never published
    run.push()
    # "another node": its own cache folder, nothing but the location
    monkeypatch.setenv("RAYREC_CACHE_DIR", str(tmp_path / "other-node"))
    other = RunDir.open(run.location).pull()
    assert [m["loss"] for m in other.read_metrics()] == [1.0]
    assert other.read_json(other.eval_path) == {"test/recall@10": 0.1}
    assert (other.index_dir / "index.json").read_text() == "{}"
    if run.uri is not None:
        assert other.path != run.path and not other.workers_dir.exists()
    assert other.location == run.location


def test_runs_are_listed_and_read_where_they_live(location, cache):
    """rayrec runs list / compare read a run's files in the store, without mirroring it."""
    from training.run_report import load_run
    from training.runs import list_runs, run_dir

    run = run_dir(location, "run-d")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_json(run.meta_path, {"run_id": "run-d", "kind": "two_tower", "world_size": 2})
    run.append_metrics({"epoch": 0, "loss": 1.0})
    run.append_metrics({"event": "progress", "epoch": 1, "step": 3, "loss": 0.9, "examples_per_s": 10.0})
    run.write_json(run.eval_path, {"test/recall@10": 0.1})
    run_dir(location, "no-meta").path.mkdir(parents=True, exist_ok=True)
    assert [r.run_id for r in list_runs(location)] == ["run-d"]
    record = load_run(run_dir(location, "run-d"))
    assert record.meta["kind"] == "two_tower" and record.final == {"epoch": 0, "loss": 1.0}
    assert record.test == {"test/recall@10": 0.1} and record.status == "finished"
    assert run.read_published("tensorboard") is None  # a folder, not a file


def test_checkpoint_listing_and_completeness_read_the_store(location, cache, tmp_path):
    """Completeness is judged from the store (a URI needs no download), and the incomplete
    folder is removed there."""
    import torch
    import torch.distributed.checkpoint as dcp

    from training import storage
    from training.checkpoint import TRAIN_STATE, incomplete_reason, remove_incomplete_checkpoints
    from training.runs import run_dir

    staged = tmp_path / "ckpt"
    dcp.save({"w": torch.arange(6.0)}, checkpoint_id=str(staged), no_dist=True)
    (staged / TRAIN_STATE).write_text('{"epoch": 0}')
    run = run_dir(location, "run-c")
    storage.upload(staged, storage.join(run.location, "checkpoint_000000"))
    (staged / TRAIN_STATE).unlink()
    storage.upload(staged, storage.join(run.location, "checkpoint_000001"))  # no commit record
    folders = run.checkpoint_folders()
    assert [str(f).rsplit("/", 1)[-1] for f in folders] == ["checkpoint_000000", "checkpoint_000001"]
    assert incomplete_reason(folders[0]) is None
    assert "train_state.json" in incomplete_reason(folders[1])
    removed = remove_incomplete_checkpoints(run)
    assert list(removed) == ["checkpoint_000001"] and run.checkpoints() == folders[:1]


def test_a_missing_uri_is_named_in_the_error(s3, cache):
    from training import storage

    with pytest.raises(FileNotFoundError, match="s3://rayrec/no/such/dataset"):
        storage.local_path("s3://rayrec/no/such/dataset")
    with pytest.raises(storage.StorageError, match="nope://x"):
        storage.resolve("nope://x/y")


def test_a_worker_on_a_node_that_cannot_see_a_local_run_or_dataset_stops_naming_it(tmp_path, ml100k_dir):
    """The shared-storage check runs on each worker's node (training.jobs.launch.worker_run): a
    local runs_dir whose meta.json the driver wrote but this node cannot see is refused."""
    from training import storage
    from training.jobs.launch import worker_run

    missing_run = tmp_path / "driver-only" / "runs" / "r1"  # what another node sees: nothing
    with pytest.raises(storage.SharedStorageError, match=r"runs_dir: .*driver-only/runs/r1.*s3://"):
        worker_run({"run_dir": str(missing_run), "data_dir": str(ml100k_dir)})
    missing_run.mkdir(parents=True)
    (missing_run / "meta.json").write_text("{}")
    with pytest.raises(storage.SharedStorageError, match=r"data.path: .*nowhere"):
        worker_run({"run_dir": str(missing_run), "data_dir": str(tmp_path / "nowhere")})
    run, data = worker_run({"run_dir": str(missing_run), "data_dir": str(ml100k_dir)})
    assert run.path == missing_run and data == ml100k_dir


def test_feedback_parts_are_published_to_object_storage_and_read_back_from_it(s3, cache, tmp_path):
    """The feedback WAL stays on local disk; compacted parts go to the archive URI, a part
    whose upload failed is published at the next compaction, and read_feedback reads the URI."""
    from serving.feedback_log import FeedbackEvent, FeedbackLog, count_by_event_id, read_feedback

    archive = "s3://rayrec/feedback-test"
    log = FeedbackLog(tmp_path / "feedback", archive="s3://no-such-bucket-here/feedback")
    log.append([FeedbackEvent(f"e-{i}", user_id=1, item_id=i, event="click", timestamp=0) for i in range(3)])
    assert log.compact() == 3  # the part is durable locally even though the store refused it
    assert read_feedback(tmp_path / "feedback").num_rows == 3
    log.archive, log._archived = archive, None  # the store is reachable again
    log.append([FeedbackEvent("e-3", user_id=2, item_id=9, event="click", timestamp=0)])
    assert log.compact() == 1
    assert count_by_event_id(read_feedback(archive)) == {f"e-{i}": 1 for i in range(4)}
