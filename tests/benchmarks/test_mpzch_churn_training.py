"""The churn harness of ``bench_training.py --parts churn`` at toy size: 2 simulated days of the
real 2-worker job, TTL eviction on vs off, tables far smaller than the stream's ids.

With a 12 h TTL every id of day 0 is stale by day 1's clock. The TTL arm must hand those rows to
day 1's ids (evictions counted by the job, which resets each reassigned row), so after day 1 it
holds fewer stale rows and leaves fewer of the day's ids without a row than the arm without
eviction, which stays full of day 0's ids.

The 4 job calls (2 arms x 2 days: day 0 an ordinary run, day 1 ``rayrec train --continue`` on
the day's events) are the ones the continual-days test's run already makes with this very config
(``DaysConfig.churn()``: same stream, tables and overrides): the session's ``toy_days``
(tests/benchmarks/conftest.py) keeps every record ``continue_day`` returned, and this test
aggregates them as ``churn_rows`` does.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from mpzch_churn_training import ARMS, aggregate, markdown_section, plot  # noqa: E402

from tests.benchmarks.conftest import TOY as DAYS  # noqa: E402

TOY = DAYS.churn()


def value(rows: list[dict], metric: str, eviction: str, day: int, table: str | None = None) -> float:
    return next(r["value"] for r in rows if r["metric"] == metric and r["params"]["eviction"] == eviction
                and r["params"]["day"] == day and r["params"].get("table") == table and r["params"]["stat"] == "mean")


def test_ttl_eviction_frees_stale_rows_for_the_next_day(toy_days, tmp_path):
    # churn_rows' records for seed 0: per arm, one record per day of the arm's resumed run
    rows = aggregate({arm: [[toy_days.churn[arm, day] for day in range(TOY.days)]] for arm in ARMS}, TOY)
    for table in ("user", "item"):
        # day 0: nothing has expired yet, both arms hold the same ids
        assert value(rows, "stale_row_share", "ttl", 0, table) == value(rows, "stale_row_share", "none", 0, table) == 0
        assert value(rows, "evictions", "ttl", 0, table) == 0
        # day 1: the full eviction-free table is stuck with day 0's ids; TTL gave their rows away
        assert value(rows, "evictions", "none", 1, table) == 0
        assert value(rows, "evictions", "ttl", 1, table) > 0
        assert value(rows, "stale_row_share", "none", 1, table) > 0.1
        assert value(rows, "stale_row_share", "ttl", 1, table) < 0.5 * value(rows, "stale_row_share", "none", 1, table)
        assert value(rows, "no_own_row_share", "ttl", 1, table) < value(rows, "no_own_row_share", "none", 1, table)
    for arm in ("ttl", "none"):
        assert 0 <= value(rows, "recall@10", arm, 1) <= 1
    # the report comes from the rows alone
    section = "\n".join(markdown_section(rows, "churn.png"))
    assert "| 1 |" in section and "Recall@10" in section
    plot(rows, tmp_path / "churn.png")
    assert (tmp_path / "churn.png").stat().st_size > 10_000
