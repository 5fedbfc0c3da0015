"""``bench_continual.py --parts days`` at toy size: 2 simulated days, one seed, the real 2-worker
job for every arm. What could silently go wrong is which data each arm trains on, so that is
checked from the runs themselves: frozen never trains after day 0, the daily retrain trains on
the union of the days so far from scratch, continual on one day resuming yesterday. Then the
scorer's yardstick (the truth served scores 1) and the report rendered from the rows alone.
The runs are the session's ``toy_days`` (tests/benchmarks/conftest.py), shared with the churn test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from churn_days import read_stream, union_folder, write_days  # noqa: E402
from continual_days import ARMS  # noqa: E402
from continual_days_report import markdown_section  # noqa: E402
from day_scorer import DayTruth  # noqa: E402

from tests.benchmarks.conftest import TOY  # noqa: E402

WORLD, BATCH = 2, 64


def rows_of(folder: Path) -> int:
    return pq.read_metadata(folder / "interactions" / "train.parquet").num_rows


def epochs_of(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "train_s" in m and "epoch" in m]


def test_union_folder_is_every_day_so_far(tmp_path):
    stream = write_days(tmp_path, users=800, items=300, events_per_day=600, days=3, seed=1)
    union = union_folder(stream, 2)
    assert rows_of(union) == sum(rows_of(stream.folders[d]) for d in range(3))
    for split in ("valid", "test"):  # the day's own targets and catalogue
        assert pq.read_table(union / "interactions" / f"{split}.parquet").equals(
            pq.read_table(stream.folders[2] / "interactions" / "test.parquet"))
    assert pq.read_table(union / "items.parquet").equals(pq.read_table(stream.folders[2] / "items.parquet"))


def test_clicks_are_the_preferred_exposures_and_every_reader_keeps_the_same(tmp_path):
    stream = write_days(tmp_path, users=800, items=300, events_per_day=2_000, days=1, seed=3, clicks=True)
    exposures, _ = read_stream(stream.stream_dir)
    clicks, day_of = read_stream(stream.stream_dir, clicks=True)
    assert clicks.equals(read_stream(stream.stream_dir, clicks=True)[0])  # the same draw for every reader
    assert 0.2 * exposures.num_rows < clicks.num_rows < 0.9 * exposures.num_rows
    assert rows_of(stream.folders[0]) == int((day_of == 0).sum())  # day 0's folder trains on its clicks
    # a click is drawn with probability σ(z): the clicked exposures are the preferred ones
    keys = ["user_id", "item_id", "timestamp"]
    raw = pq.read_table(stream.stream_dir / "interactions" / "train.parquet", columns=[*keys, "true_pref"])
    kept = raw.join(clicks.select(keys), keys=keys, join_type="inner")
    assert kept.num_rows > 0
    assert np.mean(kept.column("true_pref").to_numpy()) > np.mean(raw.column("true_pref").to_numpy()) + 0.05


def test_truth_served_scores_one(tmp_path):
    stream = write_days(tmp_path, users=800, items=300, events_per_day=600, days=1, seed=2)
    truth = DayTruth.build(stream, 0, history_len=20, max_users=200, seed=0)
    perfect = truth.metrics(truth.truth_top)
    assert perfect["true_recall@10"] == 1.0 and abs(perfect["true_ndcg@10"] - 1.0) < 1e-9
    assert not truth.seen[np.arange(truth.seen.shape[0])[:, None], truth.truth_top].any()  # seen never counts
    targets = truth.target.clip(min=0)[:, None].repeat(10, axis=1)  # serve each user's next-day event
    assert truth.metrics(targets)["event_recall@10"] == 1.0
    refs = truth.references(seed=0)
    assert refs["popularity"]["cold_item_share@10"] == 0.0  # a cold item has no event to be popular by
    assert refs["random"]["true_recall@10"] < 0.2 and refs["random"]["cold_item_share@10"] > 0


def test_three_arms_train_on_the_right_days(toy_days):
    # the session's one run of every arm (tests/benchmarks/conftest.py; the churn test reads it too)
    rows, details, work = toy_days.rows, toy_days.details, toy_days.work
    runs = work / "runs-seed0"
    day_rows = [rows_of(work / "data-seed0" / f"day-{d}") for d in range(TOY.days)]
    records = details["records"][0]

    # frozen: the retrain's day-0 run, one epoch on day 0 and never trained again
    assert [m["epoch"] for m in epochs_of(runs / "retrain-seed0-day0")] == [0]
    assert records["frozen"][1]["compute"]["examples"] == 0
    assert records["frozen"][0]["compute"] == records["daily_retrain"][0]["compute"]
    # daily retrain: a fresh run each day (its own single epoch) on days 0..d
    for d in range(TOY.days):
        (epoch,) = epochs_of(runs / f"retrain-seed0-day{d}")
        assert epoch["epoch"] == 0
        union = sum(day_rows[: d + 1])
        assert union - WORLD * (BATCH + 1) < records["daily_retrain"][d]["compute"]["examples"] <= union
    # continual: day 0 an ordinary run, then each day `rayrec train --continue` on that day's
    # events, read from the arm's feedback log as one part, every event trained once
    for arm, eviction in (("continual", "ttl"), ("continual_no_eviction", "none")):
        assert [m["epoch"] for m in epochs_of(runs / f"churn-{eviction}-seed0")] == [0]
        assert day_rows[0] - WORLD * (BATCH + 1) < records[arm][0]["compute"]["examples"] <= day_rows[0]
        for d in range(1, TOY.days):
            version = runs / f"churn-{eviction}-seed0-c{d:04d}"
            assert [m["epoch"] for m in epochs_of(version)] == [0]
            continued = json.loads((version / "meta.json").read_text())["continued_from"]
            assert continued["run"].endswith(f"churn-{eviction}-seed0" + (f"-c{d - 1:04d}" if d > 1 else ""))
            assert continued["events"] == continued["positives"] == day_rows[d] == records[arm][d]["compute"]["examples"]
            assert len(continued["parts"]) == 1 and f"day{d}" in continued["parts"][0]
    assert records["frozen"][0]["true_recall@10"] >= 0
    # an id-only two-tower serves only items holding a row of their own (an item with no event on
    # days 0..d has none), while the random reference does pick such items
    assert all(r["cold_item_share@10"] == 0 for arm in ARMS for r in records[arm])
    assert records["random"][1]["cold_item_share@10"] > 0

    # the report from the rows alone, as bench_continual.py stores them
    stored = [{**r, "params": {"part": "days", **r["params"]}} for r in rows]
    section = "\n".join(markdown_section(stored, details))
    assert "| 1 |" in section and "continual - frozen" in section and "Continual / daily retrain:" in section
    assert "one seed: no verdict" in section  # one seed: no SE, so no claim
    assert markdown_section([r for r in stored if r["params"]["part"] != "days"], None) == []
