"""One toy churning stream and one set of real 2-worker runs over it, shared by the
continual-days test (test_continual_days.py) and the TTL churn test (test_mpzch_churn_training.py).

``bench_continual.py --parts days`` trains, per day, the daily retrain and both continual arms
(``continual_days.continue_day``: day 0 an ordinary run, every later day ``rayrec train
--continue`` on the arm's feedback log), TTL eviction on and off. So the session runs the days
benchmark once (6 job calls) and keeps what each ``continue_day`` call returned: the churn test
aggregates those records (per table stale rows, ids without a row, evictions) with the churn
benchmark's own ``aggregate``, so TTL eviction is checked in the incremental job itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import continual_days  # noqa: E402
from continual_days import DaysConfig, days_rows  # noqa: E402

# both benchmarks at toy size: 2 simulated days, one seed, tables far smaller than the stream's ids
TOY = DaysConfig(
    users=1_500, items=500, events_per_day=1_500, days=2, epochs_per_day=1, continual_batch=64, seeds=[0], max_users=300,
    overrides=["model.user_cardinality=400", "model.item_cardinality=160", "model.tables.ttl_hours=12",
               "train.batch_size=64", "eval.ks=[10]", "eval.max_users=200"],
)


@dataclass
class ToyDays:
    """``days_rows(TOY, work)`` and the record of every continual job call.

    Args:
        work: the benchmark's folder (``data-seed0/``, ``runs-seed0/``, ``records-seed0.json``).
        rows / details: what ``days_rows`` returned.
        churn: ``{(eviction, day): record}`` as ``mpzch_churn_training.run_day`` returned it.
    """

    work: Path
    rows: list[dict]
    details: dict
    churn: dict[tuple[str, int], dict]


@pytest.fixture(scope="session")
def toy_days(ray_session, tmp_path_factory: pytest.TempPathFactory) -> ToyDays:
    work = tmp_path_factory.mktemp("days")
    churn: dict[tuple[str, int], dict] = {}
    continue_day = continual_days.continue_day

    def recorded(cfg, stream, eviction, seed, runs_dir, feedback, day):  # the real job call, its record kept
        run, record = continue_day(cfg, stream, eviction, seed, runs_dir, feedback, day)
        churn[eviction, day] = record
        return run, record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(continual_days, "continue_day", recorded)
        rows, details = days_rows(TOY, work)
    assert sorted(churn) == [(e, d) for e in ("none", "ttl") for d in range(TOY.days)]
    return ToyDays(work, rows, details, churn)
