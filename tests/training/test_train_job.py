"""The two-tower job end to end: 2 Ray Train workers, row-wise MPZCH tables, DCP checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from training.checkpoint import is_complete
from tests.conftest import REPO


def test_loss_falls_and_metrics_are_reported(tiny_run):
    records = list(tiny_run.read_metrics())
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["loss"] < records[0]["loss"]
    # random ranking would give ~10/1682 = 0.006
    assert records[-1]["valid/recall@10"] > 0.03
    assert records[-1]["valid/users"] == 943
    # MPZCH counters: every id got its own row (load ~0.2, max_probe 128)
    assert records[0]["mpzch/item/inserts"] > 1000
    assert records[-1]["mpzch/item/fallbacks"] == 0
    assert records[-1]["mpzch/user/fallbacks"] == 0


def test_run_folder_layout(tiny_run, ml100k_dir):
    meta = json.loads(tiny_run.meta_path.read_text())
    assert meta["seed"] == 7 and meta["world_size"] == 2
    assert "max_steps_per_epoch: 40" in tiny_run.config_path.read_text()
    ckpts = tiny_run.checkpoints()
    assert 1 <= len(ckpts) <= 2 and all(is_complete(c) for c in ckpts)
    # both ranks wrote their shards into the merged folder
    assert sorted(p.name for p in ckpts[-1].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    index = json.loads((tiny_run.index_dir / "index.json").read_text())
    assert index["num_items"] + index["items_without_row"] == 1682 and index["num_users"] == 943
    items = pq.read_table(tiny_run.index_dir / "items.parquet")
    assert items.num_rows == index["num_items"] and len(items.column("embedding")[0]) == index["dim"] == 32
    # only items the table admitted are served: the 5 ml-100k titles never in train hold no row
    # (MPZCH's readonly lookup would give them another id's vector)
    trained = pq.read_table(ml100k_dir / "interactions" / "train.parquet", columns=["item_id"]).column(0).to_numpy()
    indexed = items.column("item_id").to_numpy()
    assert np.isin(indexed, trained).all() and index["items_without_row"] >= 5
    test = json.loads(tiny_run.eval_path.read_text())
    assert 0 < test["test/recall@10"] <= test["test/recall@50"] <= 1


def _restore_worker(run_dir: str, ckpt: str, store: str, out: str) -> None:
    """In a fresh process: a 1-rank DMP loads the 2-rank checkpoint and embeds every item.

    The process group meets through a file store, not a TCP port: a port picked free here can
    be taken by the session's Ray before gloo binds it.
    """
    import pyarrow as pa

    from embeddings.sharding import shard_model
    from embeddings.tables import mpzch_modules
    from training.checkpoint import load_checkpoint
    from training.config import load_config
    from embeddings.tables import set_mpzch_training as _set_mpzch_training
    from training.eval.distributed import embed_rows
    from training.models.two_tower import build_two_tower, table_specs
    from tests.process_group import join_group, leave_group

    join_group(0, 1, store)
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model = shard_model(build_two_tower(cfg.model, torch.device("meta")), table_specs(cfg.model), torch.device("cpu"))
    state = load_checkpoint(model, None, ckpt)
    model.eval()
    _set_mpzch_training(model, False)
    items = pq.read_table(os.path.join(run_dir, "index", "items.parquet"))
    emb = embed_rows(model, pa.table({"item_id": items.column("item_id")}), ["item_id"], 512, tower="item")
    ids = {n: int((m._hash_zch_identities != -1).sum()) for n, m in mpzch_modules(model).items()}
    torch.save({"emb": emb, "epoch": state["epoch"], "ids": ids}, out)
    leave_group()


def test_checkpoint_restores_on_one_rank_to_identical_scores(tiny_run, tmp_path):
    out = tmp_path / "restored.pt"
    code = (
        "import sys; sys.path.insert(0, %r); from tests.training.test_train_job import _restore_worker; "
        "_restore_worker(%r, %r, %r, %r)"
    ) % (str(REPO), str(tiny_run.path), str(tiny_run.checkpoints()[-1]), str(tmp_path / "pg-store"), str(out))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"restore process exited {done.returncode}:\n{done.stderr[-3000:]}"
    restored = torch.load(out)
    exported = pq.read_table(tiny_run.index_dir / "items.parquet").column("embedding").to_pylist()
    assert restored["epoch"] == 1
    # identities survive 2 -> 1 resharding: one per id the run inserted (80 steps see most, not all)
    inserted = {t: sum(r[f"mpzch/{t}/inserts"] for r in tiny_run.read_metrics()) for t in ("user", "item")}
    assert restored["ids"] == inserted
    np.testing.assert_allclose(restored["emb"].numpy(), np.asarray(exported, dtype=np.float32), atol=1e-5)


def test_bad_config_fails_before_any_worker_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: two_tower\ntrain:\n  epochs: 0\n  batch_sise: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--config", str(bad)],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert proc.returncode == 2
    assert "train.batch_sise: unknown key" in proc.stderr
    assert "train.epochs: Input should be greater than 0" in proc.stderr


def test_resume_with_fewer_workers_continues_from_the_checkpoint(tiny_run, tmp_path):
    """Elastic restart: the 2-worker run resumes on 1 worker (TorchRec re-plans, DCP reshards)."""
    import shutil

    from training.config import load_config
    from training.jobs.train_retrieval import run
    from training.runs import RunDir

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.path, runs / "tiny")
    cfg = load_config(tiny_run.config_path, [f"runs_dir={runs}", "scaling.num_workers=1", "train.epochs=3"])
    resumed = run(cfg, run_id="tiny")
    assert resumed.path == RunDir(runs / "tiny").path
    records = [r for r in resumed.read_metrics() if "event" not in r]
    assert [r["epoch"] for r in records] == [0, 1, 2]  # epoch 2 only: 0 and 1 came from the copy
    events = [r for r in resumed.read_metrics() if r.get("event") == "resumed"]
    assert events == [{**events[0], "epoch": 2, "world_size": 1, "identities_match": True}]
    assert json.loads(resumed.meta_path.read_text())["restarts"] == 1
    # ids already in the tables are found, not re-inserted, after resharding 2 -> 1
    assert records[2]["mpzch/item/hits"] > 0
    assert records[2]["mpzch/item/inserts"] < records[0]["mpzch/item/inserts"]


def test_offline_eval_of_the_index_reproduces_the_jobs_test_metrics(tiny_run):
    """`rayrec eval` (exported embeddings) and the job's collective eval are one harness."""
    from training.eval.run_eval import evaluate_run

    rows = {r["system"]: r for r in evaluate_run(tiny_run.path, ks=[10, 50], faiss=True)}
    test = json.loads(tiny_run.eval_path.read_text())
    assert rows["two_tower_exact"]["recall@10"] == pytest.approx(test["test/recall@10"], abs=1e-9)
    assert rows["two_tower_exact"]["ndcg@10"] == pytest.approx(test["test/ndcg@10"], abs=1e-6)
    assert set(rows) == {"two_tower_exact", "popularity", "faiss_ivf", "faiss_hnsw"}
    assert rows["popularity"]["users"] == 943 and 0 < rows["popularity"]["recall@50"] < 1
    assert rows["faiss_ivf"]["items_scored"] < rows["two_tower_exact"]["items_scored"]


def test_partial_checkpoint_folders_are_never_listed_or_loaded_and_get_removed(tiny_run, tmp_path):
    """What an interrupted save leaves (see test_fault_tolerance) is not a checkpoint to rayrec."""
    import shutil

    from training.checkpoint import (
        TRAIN_STATE,
        IncompleteCheckpointError,
        is_complete,
        load_checkpoint,
        remove_incomplete_checkpoints,
    )
    from training.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.path.mkdir()

    def damaged_copy(name: str, drop: tuple[str, ...] = (), truncate: tuple[str, ...] = ()):
        folder = run.path / name
        shutil.copytree(tiny_run.checkpoints()[-1], folder)
        for file in drop:
            (folder / file).unlink()
        for file in truncate:
            os.truncate(folder / file, (folder / file).stat().st_size // 2)
        return folder

    committed = damaged_copy("checkpoint_0")
    partial = {  # folder -> the reason it is refused
        damaged_copy("checkpoint_1", drop=(".metadata", "__0_0.distcp", TRAIN_STATE)): TRAIN_STATE,  # what Ray leaves
        damaged_copy("checkpoint_2", drop=(TRAIN_STATE,)): TRAIN_STATE,  # killed before the commit record
        damaged_copy("checkpoint_3", truncate=(TRAIN_STATE,)): f"unreadable {TRAIN_STATE}",
        damaged_copy("checkpoint_4", drop=("__1_0.distcp",)): "shard __1_0.distcp missing",  # a rank's files lost
        damaged_copy("checkpoint_5", truncate=("__0_0.distcp",)): "shard __0_0.distcp truncated",
    }
    assert is_complete(committed) and run.checkpoints() == [committed]
    for folder, reason in partial.items():
        assert not is_complete(folder)
        with pytest.raises(IncompleteCheckpointError, match=reason):
            load_checkpoint(torch.nn.Linear(1, 1), None, folder)

    restoring = next(iter(partial))  # never deleted, even when partial (loading it raises instead)
    removed = remove_incomplete_checkpoints(run, keep=str(restoring))
    assert sorted(removed) == sorted(f.name for f in partial if f != restoring)
    assert all(reason in removed[f.name] for f, reason in partial.items() if f != restoring)
    assert run.checkpoint_folders() == [committed, restoring]
    assert [r for r in run.read_metrics()] == [{"event": "removed_incomplete_checkpoints", "removed": removed}]
    assert remove_incomplete_checkpoints(run, keep=str(restoring)) == {}
