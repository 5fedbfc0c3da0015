"""A Ray Train worker killed mid-epoch: the run restarts from the latest checkpoint and finishes
as if nothing happened (same examples in the replayed epoch, same MPZCH identities, metrics
within run-to-run noise of the uninterrupted run with the same seed)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from tests.conftest import REPO


def _registered_checkpoints(run_dir) -> int:
    """Checkpoints Ray Train's controller has registered (what a restart resumes from)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return len(snapshot.get("checkpoint_results", []))


def _kill_rank_when(run_dir, rank: int, epoch: int, step: int, killed: dict, timeout_s: float = 600) -> None:
    """SIGKILL ``rank`` mid-training in ``epoch`` (past ``step``) once the previous epoch's
    checkpoint is registered.

    A worker that dies before the controller registers a reported checkpoint restarts from the
    one before (Ray Train's semantics), so the kill waits for the registration.
    """
    from training.runs import RunDir

    run = RunDir(run_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beat = run.read_heartbeat(rank)
        in_training = beat and beat.get("phase") == "train" and beat["epoch"] == epoch and beat["step"] >= step
        if in_training and _registered_checkpoints(run_dir) >= epoch:
            os.kill(beat["pid"], signal.SIGKILL)
            killed.update(beat)
            return
        time.sleep(0.05)


def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted_run(ray_session, ml100k_dir, tiny_run, tmp_path):
    from training.config import load_config
    from training.jobs.train_retrieval import run

    runs = tmp_path / "runs"
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={ml100k_dir}", f"runs_dir={runs}", "failure.max_failures=2"])
    killed: dict = {}
    killer = threading.Thread(target=_kill_rank_when, args=(runs / "killed", 1, 1, 3, killed), daemon=True)
    killer.start()
    result = run(cfg, run_id="killed")  # the driver blocks here while the thread kills rank 1
    killer.join(timeout=5)
    assert killed, "rank 1 was never mid-training in epoch 1 with epoch 0 checkpointed"

    records = [r for r in result.read_metrics() if "event" not in r]
    events = [r for r in result.read_metrics() if r.get("event") == "resumed"]
    assert [r["epoch"] for r in records] == [0, 1]  # epoch 1 reported once, after the replay
    assert len(events) == 1 and events[0]["epoch"] == 1 and events[0]["identities_match"]

    reference = [r for r in tiny_run.read_metrics() if "event" not in r]
    # the replayed epoch consumed exactly the examples of the uninterrupted one
    assert [r["examples_digest"] for r in records] == [r["examples_digest"] for r in reference]
    assert abs(records[1]["loss"] - reference[1]["loss"]) < 0.05
    assert abs(records[1]["valid/recall@10"] - reference[1]["valid/recall@10"]) < 0.02
    assert result.eval_path.exists() and (result.index_dir / "index.json").exists()
