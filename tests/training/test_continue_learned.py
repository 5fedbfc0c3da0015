"""``rayrec train --continue`` of the learned-index runs (MFLI, HSNN): the tiny runs trained on a
feedback log whose app added items live (the catalogue log), 2 Ray Train workers.

What it shows: a continued version trains every new positive once and commits the watermark
(as the two-tower's does); MFLI's learned index and content encoder hold the items added live,
and an item added live that users clicked is learned from those clicks: it ranks higher for them
under the new version than under the content-only vector the app served it with before; HSNN's
tree places the new items and its index is exported whole (scorer, user packs, TTT pool).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.training.test_continue import _trained_records, _write_part

CLICKED, QUIET = 910_001, 910_002  # added live; CLICKED gets clicks, QUIET none
CLICKERS = list(range(1, 41))  # ml-100k users who click CLICKED


def _live_items(feedback: Path, items: pa.Table) -> list:
    """The app's catalogue log: two items added live with the content of two catalogue items,
    and one catalogue item removed."""
    from training.data.catalogue_log import CATALOGUE_DIR, CATALOGUE_FILE, CatalogueLog, ItemChange

    rows = items.to_pylist()
    changes = [ItemChange(new, rows[k]["title"], tuple(rows[k]["genres"]), rows[k]["year"])
               for new, k in ((CLICKED, 0), (QUIET, 49))]
    CatalogueLog(feedback / CATALOGUE_DIR / CATALOGUE_FILE).append([*changes, ItemChange.removal(int(rows[9]["item_id"]))])
    return changes


def _events() -> list[dict]:
    """Each clicker clicks CLICKED three times, with a click on a catalogue item between."""
    rng = np.random.default_rng(3)
    events = []
    for rep in range(3):
        for user in CLICKERS:
            for item in (CLICKED, int(rng.integers(1, 1683))):
                k = len(events)
                events.append({"event_id": f"m{k:05d}", "user_id": user, "item_id": item, "event": "click",
                               "timestamp": 1_800_000_000 + k, "request_id": "", "received_ms": 1_800_000_000_000 + k})
    return events


def _rank_of(item: int, users: list[int], user_vecs: dict[int, np.ndarray], item_ids: np.ndarray, item_vecs: np.ndarray) -> float:
    """Mean rank (0 = top) of ``item`` among ``item_ids`` by dot product for ``users``."""
    pos = int(np.flatnonzero(item_ids == item)[0])
    scores = np.stack([user_vecs[u] for u in users]) @ item_vecs.T  # [U, N]
    return float((scores > scores[:, pos : pos + 1]).sum(axis=1).mean())


def _vectors(path: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    return table.column(key).to_numpy(), np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def continued_mfli(tiny_mfli_run, ml100k_dir, tmp_path_factory):
    from training.jobs.continue_retrieval import continue_run

    root = tmp_path_factory.mktemp("continue-mfli")
    parent = root / "runs" / "tiny-mfli"
    shutil.copytree(tiny_mfli_run.path, parent, ignore=shutil.ignore_patterns("failpoints", "workers"))
    feedback = root / "feedback"
    feedback.mkdir()
    changes = _live_items(feedback, pq.read_table(ml100k_dir / "items.parquet"))
    events = _events()
    _write_part(feedback, events[: len(events) // 2], 1_800_000_100_000)
    _write_part(feedback, events[len(events) // 2 :], 1_800_000_100_001)
    done = continue_run(str(parent), str(feedback), ["continual.batch_size=32", "continual.epochs=2"])
    return parent, feedback, events, changes, done


def test_continue_trains_an_mfli_run_and_commits_the_watermark(continued_mfli):
    from training.checkpoint import read_train_state

    parent, feedback, events, _, done = continued_mfli
    run = done.run
    assert run is not None and run.run_id == "tiny-mfli-c0001"
    index = json.loads((run.index_dir / "index.json").read_text())
    assert index["model"] == "mfli" and index["version"] == "tiny-mfli-c0001/epoch-0001"
    trained = _trained_records(run)  # 2 epochs, each trained every click once
    assert [(r["epoch"], r["events"], r["seq_ranges"]) for r in trained] == [
        (e, len(events), [[0, len(events) - 1]]) for e in (0, 1)]
    state = read_train_state(run.checkpoints()[-1])
    assert state["watermark"]["events"] == len(events) and state["attempt"] == trained[-1]["attempt"]
    assert state["watermark"]["parts"] == sorted(p.name for p in feedback.glob("part-*"))
    meta = json.loads(run.meta_path.read_text())["continued_from"]
    assert meta["live_items"] == 2 and meta["new_items"] == 0
    assert json.loads(run.eval_path.read_text())["test_mfli/recall@10"] > 0


def test_the_continued_index_serves_the_live_items_with_trained_vectors(continued_mfli):
    """Both live items are in the new learned index (a replayed catalogue log then keeps their
    trained vectors, ``serving.live_items``), and the clicked one moved toward its clickers."""
    from training.data.catalogue_log import content_table
    from training.index.content_encoder import ENCODER_DIR, ContentEncoder
    from training.index.mfli_index import MFLIIndex
    from training.models.mfli import FACETS

    parent, _, _, changes, done = continued_mfli
    run = done.run
    learned = MFLIIndex.load(run.mfli_index_dir)
    assert {CLICKED, QUIET} <= set(learned.item_ids().tolist())
    # the new version's content encoder knows the live items' tokens (it embeds from them too)
    encoder = ContentEncoder.load(run.mfli_index_dir / ENCODER_DIR)
    assert set(encoder.encode(content_table(changes))) == {"engagement", "semantic"}

    # before: the parent's vectors, CLICKED embedded from content as the app served it
    users, user_emb = _vectors(parent / "index" / "users.parquet", "user_id")
    items, item_emb = _vectors(parent / "index" / "items.parquet", "item_id")
    content = ContentEncoder.load(parent / "index" / "mfli" / ENCODER_DIR).encode(content_table(changes[:1]))
    live_vec = np.concatenate([content[name].numpy() for name in FACETS], axis=1)
    before = _rank_of(CLICKED, CLICKERS, dict(zip(users.tolist(), user_emb)),
                      np.append(items, CLICKED), np.concatenate([item_emb, live_vec]))
    # after: the continued version's own export, which trained CLICKED's id row on the clicks
    users, user_emb = _vectors(run.index_dir / "users.parquet", "user_id")
    items, item_emb = _vectors(run.index_dir / "items.parquet", "item_id")
    after = _rank_of(CLICKED, CLICKERS, dict(zip(users.tolist(), user_emb)), items, item_emb)
    assert after < before / 2, (before, after)


def test_continue_refuses_a_kind_it_cannot_train(tmp_path):
    from training.jobs.continue_retrieval import ContinueError, continue_run

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("kind: ranker\n")
    with pytest.raises(ContinueError, match="supports kinds two_tower, mfli, hsnn, not 'ranker'"):
        continue_run(str(run), str(tmp_path))


def test_continue_trains_an_hsnn_run_and_places_the_new_items(tiny_hsnn_run, ml100k_dir, tmp_path):
    from training.checkpoint import read_train_state
    from training.index.hsnn_index import HSNNIndex
    from training.jobs.continue_retrieval import continue_run

    parent = tmp_path / "runs" / "tiny-hsnn"
    shutil.copytree(tiny_hsnn_run.path, parent, ignore=shutil.ignore_patterns("failpoints", "workers"))
    feedback = tmp_path / "feedback"
    feedback.mkdir()
    _live_items(feedback, pq.read_table(ml100k_dir / "items.parquet"))
    events = _events()
    _write_part(feedback, events, 1_800_000_100_000)
    done = continue_run(str(parent), str(feedback), ["continual.batch_size=32"])
    run = done.run
    assert run is not None and run.run_id == "tiny-hsnn-c0001"
    trained = _trained_records(run)
    assert [(r["events"], r["seq_ranges"]) for r in trained] == [(len(events), [[0, len(events) - 1]])]
    state = read_train_state(run.checkpoints()[-1])
    assert state["watermark"]["events"] == len(events) and state["attempt"] == trained[0]["attempt"]
    index = json.loads((run.index_dir / "index.json").read_text())
    assert index["model"] == "hsnn" and index["version"].startswith("tiny-hsnn-c0001/")
    tree_items = set(HSNNIndex.load(run.index_dir / "hsnn").tree.item_ids.tolist())
    assert {CLICKED, QUIET} <= tree_items and len(tree_items) == 1682 + 2
    assert (run.index_dir / "hsnn" / "users.pt").is_file()
    assert json.loads(run.eval_path.read_text())["test_beam/recall@10"] > 0
