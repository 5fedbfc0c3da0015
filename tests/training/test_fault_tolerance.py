"""A Ray Train worker killed mid-epoch or during a checkpoint save: the run restarts from the
latest committed checkpoint and finishes as if nothing happened (same examples in the replayed
epoch, same MPZCH identities, metrics within run-to-run noise of the uninterrupted run with the
same seed); a save cut short leaves no checkpoint folder behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

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


def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted_run(tiny_run, ml100k_dir, tmp_path):
    from training.config import load_config
    from training.jobs.train_retrieval import run

    runs = tmp_path / "runs"
    # tiny_run's config and seed (max_failures 1): tiny_run is the uninterrupted run to match.
    # The kill must land mid-training, after the controller registered epoch 0's checkpoint:
    # rank 0 returns from that save only once it is registered (training.checkpoint.
    # report_checkpoint) and every step is a collective of both ranks, so rank 1's first
    # epoch-1 step already follows the registration; killing at step 10 of 40 leaves 30 steps
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={ml100k_dir}", f"runs_dir={runs}"])
    steps = cfg.train.max_steps_per_epoch

    killed: dict = {}
    killer = threading.Thread(target=_kill_rank_when, args=(runs / "killed", 1, 10, killed), daemon=True)
    killer.start()
    result = run(cfg, run_id="killed")  # the driver blocks here while the thread kills rank 1
    killer.join(timeout=5)
    assert killed, "rank 1 was never mid-training after a registered checkpoint"
    assert killed["epoch"] == 1 and 10 <= killed["step"] < steps  # mid-way through epoch 1

    records = [r for r in result.read_metrics() if "event" not in r]
    events = [r for r in result.read_metrics() if r.get("event") == "resumed"]
    assert [r["epoch"] for r in records] == [0, 1]  # the killed epoch is reported once, after its replay
    assert len(events) == 1 and events[0]["epoch"] == killed["epoch"] and events[0]["identities_match"]

    expected = [r for r in tiny_run.read_metrics() if "event" not in r]
    # every epoch, the replayed one included, consumed exactly the examples of the uninterrupted run
    assert [r["examples_digest"] for r in records] == [r["examples_digest"] for r in expected]
    assert abs(records[-1]["loss"] - expected[-1]["loss"]) < 0.05
    assert abs(records[-1]["valid/recall@10"] - expected[-1]["valid/recall@10"]) < 0.02
    assert result.eval_path.exists() and (result.index_dir / "index.json").exists()


# What Ray Train V2 (2.60) leaves in the run folder when rank 0 dies during the epoch-1 save,
# besides the registered epoch-0 checkpoint it restarts from (found with these fail points):
#   checkpoint.after_shards, checkpoint.before_report: nothing. ray.train.report() first has every
#     rank agree on the folder name through a rank-0 broadcast, so rank 1 waits there, uploads
#     nothing, and is killed with the group.
#   checkpoint.upload (rank 1's files are in storage, rank 0's are not): checkpoint_<ts>/ holding
#     only __1_0.distcp. Ray never registers it and never deletes it (num_to_keep counts
#     registered checkpoints only); rayrec's rank 0 removes it when the restarted group starts.
#   checkpoint.before_commit (every file but train_state.json): the same, with rank 0's files;
#     test_train_job checks that such folders are refused and removed without a Ray run.
@pytest.mark.parametrize("point, partial_left", [("checkpoint.before_report", False), ("checkpoint.upload", True)])
def test_rank0_killed_while_saving_resumes_from_the_previous_checkpoint(point, partial_left, tiny_run, ml100k_dir,
                                                                         tmp_path, monkeypatch):  # fmt: skip
    """Checkpoints are atomic: a save interrupted by SIGKILL (a fail point) leaves the previous
    checkpoint loadable, and the partial one is removed, never loaded."""
    from training.checkpoint import TRAIN_STATE, is_complete
    from training.config import load_config
    from training.failpoints import DIR_ENV, ENV
    from training.jobs.train_retrieval import run

    # tiny_run's config and seed (max_failures 1); fit_on_ray hands the fail point to this run's workers
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"data.path={ml100k_dir}", f"runs_dir={tmp_path / 'runs'}"])
    monkeypatch.setenv(ENV, f"{point}@rank=0,epoch=1")
    monkeypatch.delenv(DIR_ENV, raising=False)  # markers go to the run's failpoints/
    result = run(cfg, run_id="killed-saving")

    fired = [json.loads(p.read_text()) for p in result.failpoints_dir.iterdir()]
    assert [f["context"] for f in fired] == [{"rank": 0, "epoch": 1}]
    lines = list(result.read_metrics())
    removed = [r["removed"] for r in lines if r.get("event") == "removed_incomplete_checkpoints"]
    # epoch 1 was logged before its save was killed; the restarted group resumed from epoch 0's
    # checkpoint (removing the partial save first, if Ray left one) and replayed epoch 1
    assert [r.get("event", r.get("epoch")) for r in lines] == (
        [0, 1] + ["removed_incomplete_checkpoints"] * partial_left + ["resumed", 1]
    )
    resumed = next(r for r in lines if r.get("event") == "resumed")
    assert resumed["epoch"] == 1 and resumed["identities_match"]
    assert json.loads((Path(resumed["checkpoint"]) / TRAIN_STATE).read_text())["epoch"] == 0
    if partial_left:
        [(name, reason)] = removed[0].items()
        assert TRAIN_STATE in reason and not (result.path / name).exists()
    folders = result.checkpoint_folders()
    assert len(folders) == 2 and all(is_complete(f) for f in folders) and result.checkpoints() == folders

    records = [r for r in lines if "event" not in r]
    expected = [r for r in tiny_run.read_metrics() if "event" not in r]
    # the replayed epoch consumed exactly the examples of the killed attempt and of tiny_run
    assert [r["examples_digest"] for r in records] == [expected[0]["examples_digest"]] + [expected[1]["examples_digest"]] * 2
    # the tolerance of the mid-training kill test above (same reference)
    assert abs(records[-1]["loss"] - expected[-1]["loss"]) < 0.05
    assert abs(records[-1]["valid/recall@10"] - expected[-1]["valid/recall@10"]) < 0.02
    test, expected_test = (json.loads(r.eval_path.read_text()) for r in (result, tiny_run))
    assert abs(test["test/recall@10"] - expected_test["test/recall@10"]) < 0.02
