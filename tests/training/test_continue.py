"""``rayrec train --continue``: the tiny run trained on a synthetic feedback log, 2 Ray Train workers.

The log is written as serving's compaction writes it (``part-<ms>-<uuid>.parquet``), with an
extra column a newer sink adds (``model_version``), which training must ignore.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO

NEW_ITEMS = [900_001, 900_002, 900_003]  # ids ml-100k (items 1..1682) never had
NEW_USERS = [70_001, 70_002]


def _write_part(folder: Path, events: list[dict], ms: int) -> str:
    """One compacted part; returns its name."""
    name = f"part-{ms:013d}-{uuid.uuid4().hex[:8]}.parquet"
    table = pa.Table.from_pylist(events).append_column("model_version", pa.array(["tiny"] * len(events)))
    pq.write_table(table, folder / name)
    return name


def _events(first: int, n: int, seed: int) -> list[dict]:
    """n events: clicks and engagements of known and new users on known and new items, about
    every third an impression (not a positive); received_ms ties broken by event_id."""
    rng = np.random.default_rng(seed)
    users = [int(u) for u in rng.integers(1, 944, size=n)]
    items = [int(i) for i in rng.integers(1, 1683, size=n)]
    for k in range(0, n, 4):  # new items and new users get their own events
        items[k] = NEW_ITEMS[(k // 4) % len(NEW_ITEMS)]
        users[k + 1] = NEW_USERS[(k // 4) % len(NEW_USERS)]
    kinds = [["click", "engagement", "impression"][k % 3] for k in range(n)]
    for k in range(0, n, 4):  # the new ids' events are positives
        kinds[k] = kinds[k + 1] = "click"
    return [
        {"event_id": f"e{first + k:05d}", "user_id": users[k], "item_id": items[k], "event": kinds[k],
         "timestamp": 1_800_000_000 + (first + k) // 2, "request_id": "", "received_ms": 1_800_000_000_000 + (first + k) // 2}
        for k in range(n)
    ]


def _feedback(folder: Path) -> list[dict]:
    """A log of 3 parts, 90 events (about 2/3 positives); returns the events."""
    folder.mkdir(parents=True)
    events = _events(0, 90, seed=1)
    for p in range(3):
        _write_part(folder, events[p * 30 : (p + 1) * 30], 1_800_000_100_000 + p)
    return events


def _copy_run(tiny_run, runs: Path) -> Path:
    shutil.copytree(tiny_run.path, runs / "tiny", ignore=shutil.ignore_patterns("failpoints", "workers"))
    return runs / "tiny"


def _trained_records(run) -> list[dict]:
    return [r for r in run.read_metrics() if r.get("event") == "feedback_trained"]


@pytest.fixture(scope="module")
def continued(tiny_run, tmp_path_factory):
    """(parent run folder, feedback folder, events, Continuation) of one --continue."""
    from training.jobs.continue_retrieval import continue_run

    root = tmp_path_factory.mktemp("continue")
    parent = _copy_run(tiny_run, root / "runs")
    events = _feedback(root / "feedback")
    done = continue_run(str(parent), str(root / "feedback"), ["continual.batch_size=16"])
    return parent, root / "feedback", events, done


def test_continue_exports_a_new_version_with_rows_for_new_ids(continued):
    from training.checkpoint import read_train_state

    parent, feedback, events, done = continued
    run = done.run
    positives = [e for e in events if e["event"] != "impression"]
    assert run is not None and run.run_id == "tiny-c0001" and run.path.parent == parent.parent
    index = json.loads((run.index_dir / "index.json").read_text())
    parent_index = json.loads((parent / "index" / "index.json").read_text())
    assert index["version"] == "tiny-c0001/epoch-0000" != parent_index["version"]

    # every positive trained once, in one attempt; impressions read (watermark) but not trained
    trained = _trained_records(run)
    assert [(r["events"], r["seq_ranges"]) for r in trained] == [(len(positives), [[0, len(positives) - 1]])]
    state = read_train_state(run.checkpoints()[-1])
    assert state["attempt"] == trained[0]["attempt"]
    assert state["watermark"]["parts"] == sorted(p.name for p in feedback.iterdir())
    assert state["watermark"]["events"] == 90 and state["watermark"]["last_event_id"] == "e00089"

    # new ids were admitted by MPZCH (no fallback to a shared row) and exported with their own rows
    epoch = [r for r in run.read_metrics() if "event" not in r][-1]
    assert epoch["mpzch/item/inserts"] >= len(NEW_ITEMS) and epoch["mpzch/item/fallbacks"] == 0
    assert epoch["mpzch/user/inserts"] >= len(NEW_USERS) and epoch["mpzch/user/fallbacks"] == 0
    items = pq.read_table(run.index_dir / "items.parquet")
    # the catalogue plus the new items, less the ids the table never admitted (no vector of their own)
    assert items.num_rows == index["num_items"] == 1682 + len(NEW_ITEMS) - index["items_without_row"]
    assert set(NEW_ITEMS) <= set(items.column("item_id").to_pylist())
    emb = {i: e for i, e in zip(items.column("item_id").to_pylist(), items.column("embedding").to_pylist())}
    rows = np.asarray([emb[i] for i in NEW_ITEMS])
    assert np.isfinite(rows).all() and len({tuple(np.round(r, 5)) for r in rows}) == len(NEW_ITEMS)
    users = set(pq.read_table(run.index_dir / "users.parquet").column("user_id").to_pylist())
    assert set(NEW_USERS) <= users
    meta = json.loads(run.meta_path.read_text())
    assert meta["continued_from"]["run"] == str(parent) and meta["continued_from"]["new_items"] == len(NEW_ITEMS)
    assert json.loads(run.eval_path.read_text())["test/recall@10"] > 0


def test_a_second_continue_with_no_new_events_is_a_no_op(continued):
    """Naming the first run continues its newest version, which has read every part."""
    parent, feedback, _, _ = continued
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--continue", str(parent), "--feedback", str(feedback)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no new feedback" in proc.stdout and "nothing to do" in proc.stdout
    assert "3 parts, 90 events trained" in proc.stdout
    assert not (parent.parent / "tiny-c0002").exists()


def test_a_corrupt_or_missing_part_is_named(continued, tmp_path):
    from training.data.feedback import FeedbackError
    from training.jobs.continue_retrieval import continue_run

    parent, feedback, _, _ = continued
    copy = tmp_path / "feedback"
    shutil.copytree(feedback, copy)
    (copy / "part-1900000000000-deadbeef.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(FeedbackError, match="part-1900000000000-deadbeef.parquet is unreadable"):
        continue_run(str(parent), str(copy))
    gone = sorted(copy.glob("part-18*"))[1]
    gone.unlink()
    with pytest.raises(FeedbackError, match=f"{gone.name} is missing"):
        continue_run(str(parent), str(copy))
    with pytest.raises(FeedbackError, match="no such folder"):
        continue_run(str(parent), str(tmp_path / "nowhere"))


def test_the_watermark_survives_a_killed_incremental_job(tiny_run, tmp_path, monkeypatch):
    """Killed twice before the checkpoint's commit record: mid-epoch (Ray Train restarts the
    workers) and after training every new event (the job fails; a rerun of the command). Each
    attempt starts again from the parent's weights on the same events, and only the last one's
    training is in the model: each event exactly once, none skipped; then nothing is left."""
    from training.checkpoint import read_train_state
    from training.jobs.continue_retrieval import continue_run
    from training.runs import RunDir

    parent = _copy_run(tiny_run, tmp_path / "runs")
    events = _feedback(tmp_path / "feedback")
    positives = [e for e in events if e["event"] != "impression"]
    args = (str(parent), str(tmp_path / "feedback"), ["continual.batch_size=16", "failure.max_failures=1"])

    monkeypatch.setenv("RAYREC_FAILPOINTS", "continue.step@rank=1,step=1;checkpoint.before_commit@rank=0")
    with pytest.raises(Exception):
        continue_run(*args)  # 2 failures, 1 allowed
    child = RunDir(parent.parent / "tiny-c0001")
    assert sorted(p.name for p in child.failpoints_dir.iterdir()) == [
        "checkpoint.before_commit@rank=0.fired", "continue.step@rank=1,step=1.fired"]
    assert child.checkpoints() == []  # the model state and the watermark: neither committed
    monkeypatch.delenv("RAYREC_FAILPOINTS")

    done = continue_run(*args)
    assert done.run is not None and done.run.run_id == "tiny-c0001"
    started = [r["attempt"] for r in done.run.read_metrics() if r.get("event") == "continue_started"]
    assert len(set(started)) == 3 and all(r["epoch"] == 0 for r in done.run.read_metrics() if r.get("event") == "continue_started")
    trained = _trained_records(done.run)  # the mid-epoch kill came before its attempt's record
    killed, rerun = trained  # the one killed before the commit and the rerun: both trained every positive
    assert [killed["attempt"], rerun["attempt"]] == started[1:]
    assert killed["events"] == rerun["events"] == len(positives)
    state = read_train_state(done.run.checkpoints()[-1])
    assert state["attempt"] == rerun["attempt"]  # only the rerun's training is in the model
    assert rerun["seq_ranges"] == [[0, len(positives) - 1]]  # each event once, none skipped
    assert state["watermark"]["events"] == len(events)
    assert any(r.get("event") == "removed_incomplete_checkpoints" for r in done.run.read_metrics())

    again = continue_run(*args)
    assert again.run is None and "nothing to do" in again.message
