"""The RecBole atomic files of benchmarks/quality_peers.py hold rayrec's split, row for row.

No RecBole here (nor its venv): the files are read back with pandas and compared with the
Parquet splits: same users, items and counts per split, the same test target per user, and the
sequential files' histories are each user's items before the target in (timestamp, item_id) order.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.data.split import leave_one_out_split

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import quality_peers  # noqa: E402


def _tiny_split(tmp_path: Path) -> Path:
    """3 users; user 1 has 60 items with same-second ties, user 3 only 3 items."""
    rng = np.random.default_rng(0)
    users, items, times = [], [], []
    for user, n in ((1, 60), (2, 8), (3, 3)):
        users += [user] * n
        items += list(rng.choice(np.arange(1, 200), size=n, replace=False))
        times += list(rng.integers(100, 110, size=n))  # many ties: item_id decides the order
    order = rng.permutation(len(users))  # rows arrive in no particular order
    table = pa.table({"user_id": pa.array(np.array(users)[order], pa.int64()),
                      "item_id": pa.array(np.array(items)[order], pa.int64()),
                      "rating": pa.array(rng.integers(1, 6, len(users)).astype(np.float32)),
                      "timestamp": pa.array(np.array(times)[order], pa.int64())})
    split_dir = tmp_path / "interactions"
    split_dir.mkdir()
    for name, part in leave_one_out_split(table).items():
        pq.write_table(part, split_dir / f"{name}.parquet")
    return split_dir


def _check_round_trip(split_dir: Path, out: Path) -> None:
    paths = quality_peers.write_atomic(split_dir, out)
    name = quality_peers.DATASET
    splits = {s: pq.read_table(split_dir / f"{s}.parquet").to_pandas() for s in quality_peers.SPLITS}
    ordered = {s: df.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
               for s, df in splits.items()}

    for s, df in ordered.items():
        plain = quality_peers.read_atomic(paths["plain"] / name / f"{name}.{s}.inter")
        assert len(plain) == len(df)
        assert plain["user_id"].astype(int).tolist() == df["user_id"].tolist()
        assert plain["item_id"].astype(int).tolist() == df["item_id"].tolist()
        assert plain["timestamp"].astype(int).tolist() == df["timestamp"].tolist()
        assert np.allclose(plain["rating"].astype(float), df["rating"])

    # every user's full time-ordered sequence: train rows, then valid, then test
    full = {u: g["item_id"].tolist() for u, g in
            pd_concat([ordered["train"], ordered["valid"], ordered["test"]]).groupby("user_id", sort=False)}
    position = {u: {item: k for k, item in enumerate(seq)} for u, seq in full.items()}  # no repeats in a split
    test_target = dict(zip(ordered["test"]["user_id"], ordered["test"]["item_id"]))
    for s in quality_peers.SPLITS:
        seq = quality_peers.read_atomic(paths["seq"] / name / f"{name}.{s}.inter")
        expected_rows = len(ordered[s]) - (ordered["train"]["user_id"].nunique() if s == "train" else 0)
        assert len(seq) == expected_rows  # train: every row but each user's first
        for user, item, hist in zip(seq["user_id"].astype(int), seq["item_id"].astype(int), seq["item_id_list"]):
            history = [int(x) for x in hist.split()]
            pos = position[user][item]
            assert history == full[user][max(0, pos - quality_peers.MAX_HISTORY):pos]
            if s == "test":  # the test target follows train + valid, as in rayrec's eval
                assert item == test_target[user] and pos == len(full[user]) - 1


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True).sort_values(["user_id"], kind="stable")


def test_atomic_files_round_trip_a_tiny_split(tmp_path: Path) -> None:
    _check_round_trip(_tiny_split(tmp_path), tmp_path / "atomic")


ML100K = REPO / "data" / "ml-100k" / "interactions"


@pytest.mark.skipif(not (ML100K / "test.parquet").exists(), reason="ml-100k not prepared (make data)")
def test_atomic_files_round_trip_ml100k(tmp_path: Path) -> None:
    _check_round_trip(ML100K, tmp_path / "atomic")


def test_rows_mean_and_standard_error() -> None:
    runs = [{"model": "BPR", "seed": s, "test": {"recall@10": v, "ndcg@10": v / 2, "recall@50": v * 3},
             "best_epoch": 10 + s, "epochs_run": 20 + s, "converged": True, "wall_s": 1.0}
            for s, v in ((0, 0.1), (1, 0.2), (2, 0.3))]
    rows = quality_peers.rows_from_runs(runs, [0, 1, 2], models=("BPR", "SASRec"))
    got = {(r["system"], r["metric"], r["params"]["stat"]): r for r in rows}
    assert got[("bpr", "recall@10", "mean")]["value"] == 0.2
    assert got[("bpr", "recall@10", "se")]["value"] == round(0.1 / np.sqrt(3), 3)
    assert got[("bpr", "recall@10", "mean")]["params"]["seeds"] == [0, 1, 2]
    assert got[("bpr", "ndcg@10", "se")]["params"]["best_epoch"] == [10, 11, 12]
    assert got[("sasrec", "ndcg@10", "mean")]["value"] is None and "note" in got[("sasrec", "ndcg@10", "mean")]
