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


def _kill_rank_when(run_dir, rank: int, step: int, killed: dict, timeout_s: float = 600) -> None:
    """SIGKILL ``rank`` mid-training (past ``step``) in the first epoch whose previous epoch's
    checkpoint the controller has registered.

    Ray Train V2 registers a reported checkpoint asynchronously; a worker that dies before that
    restarts from the checkpoint before (its documented semantics), so the kill waits for it.
    """
    from training.runs import RunDir

    run = RunDir(run_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        beat = run.read_heartbeat(rank)
        if (
            beat
            and beat.get("phase") == "train"
            and beat["epoch"] >= 1
            and beat["step"] >= step
            and _registered_checkpoints(run_dir) >= beat["epoch"]
        ):
            os.kill(beat["pid"], signal.SIGKILL)
            killed.update(beat)
            return
        time.sleep(0.05)


def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted_run(ray_session, ml100k_dir, tmp_path):
    from training.config import load_config
    from training.jobs.train_retrieval import run

    runs = tmp_path / "runs"
    # small batches so an epoch lasts a few seconds: the kill must land mid-training, after
    # the controller registered the previous epoch's checkpoint (about a second after its report)
    overrides = [f"data.path={ml100k_dir}", f"runs_dir={runs}", "failure.max_failures=2", "train.epochs=3",
                 "train.batch_size=64", "train.max_steps_per_epoch=600"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    reference = run(cfg, run_id="reference")  # uninterrupted, same config and seed

    killed: dict = {}
    killer = threading.Thread(target=_kill_rank_when, args=(runs / "killed", 1, 50, killed), daemon=True)
    killer.start()
    result = run(cfg, run_id="killed")  # the driver blocks here while the thread kills rank 1
    killer.join(timeout=5)
    assert killed, "rank 1 was never mid-training after a registered checkpoint"

    records = [r for r in result.read_metrics() if "event" not in r]
    events = [r for r in result.read_metrics() if r.get("event") == "resumed"]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # the killed epoch is reported once, after its replay
    assert len(events) == 1 and events[0]["epoch"] == killed["epoch"] and events[0]["identities_match"]

    expected = [r for r in reference.read_metrics() if "event" not in r]
    # every epoch, the replayed one included, consumed exactly the examples of the uninterrupted run
    assert [r["examples_digest"] for r in records] == [r["examples_digest"] for r in expected]
    assert abs(records[-1]["loss"] - expected[-1]["loss"]) < 0.05
    assert abs(records[-1]["valid/recall@10"] - expected[-1]["valid/recall@10"]) < 0.02
    assert result.eval_path.exists() and (result.index_dir / "index.json").exists()
