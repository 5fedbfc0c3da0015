"""Quality over simulated days, same stream: continual vs frozen vs a daily full retrain
(``bench_continual.py --parts days``, issue #29).

Per seed, one churning stream (benchmarks/churn_days.py: 70% of the items born during it, users
by Zipf activity) cut into D training days; every arm is the real two-tower job
(``training/jobs/train_retrieval.py``: Ray Train, 2 workers, MPZCH tables sharded row-wise) on
``configs/synth-churn.yaml``, one job call per trained day, and is scored after day d on day d+1
by :mod:`day_scorer` (one protocol for every arm: live histories of days 0..d, full ranking
over the catalogue born by then, against the generator's true preference and next-day events):

- ``daily_retrain``: each day a fresh run on every event of days 0..d (``union-d`` folder);
- ``frozen``: the daily retrain's day-0 run, never trained again (its day-0 cost only);
- ``continual``: one run resumed each day on that day's events only (``epochs_per_day`` more
  epochs; :func:`mpzch_churn_training.run_day`, TTL eviction on, the MPZCH clock on day d);
- ``continual`` with ``eviction=none``: the same without eviction (its stale-row share too).

References without a model, scored the same way: ``popularity`` (the most popular unseen items
of days 0..d) and ``random`` (a random unseen top 10): the floor the arms are read against.

Compute per arm and day: the job's training-loop seconds (rank 0), examples processed (all
workers) and the job call's wall seconds (Ray Train start, data, eval, checkpoint included).

Example::

    rows, details = days_rows(DaysConfig(seeds=[0], days=2), Path("/tmp/days"))
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import statistics
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from churn_days import ChurnStream, union_folder, write_days
from continual_days_report import spec_name
from day_scorer import DayTruth
from mpzch_churn_training import ChurnConfig, arm_run_id, epoch_compute, latest_checkpoint, run_day, standard_error
from results import row

ROOT = Path(__file__).resolve().parents[1]
DATASET = "synth-churn"
ARMS = ("frozen", "continual", "daily_retrain", "continual_no_eviction")
SYSTEM = {"frozen": "frozen", "continual": "continual", "daily_retrain": "daily_retrain", "continual_no_eviction": "continual"}
EVICTION = {"frozen": "ttl", "continual": "ttl", "daily_retrain": "ttl", "continual_no_eviction": "none"}
QUALITY = ("true_recall@10", "true_ndcg@10", "event_recall@10", "event_ndcg@10", "cold_item_share@10")
COMPUTE = ("train_s", "examples", "wall_s")
REFERENCES = ("popularity", "random")  # no model: the floor the arms are read against


class DaysConfig(BaseModel):
    """The stream, the schedule and the seeds; the model comes from ``config``.

    Args:
        config: the run config (tables, TTL, batch, workers).
        users / items: U and I of the synthetic world.
        events_per_day: events in each simulated day.
        days: D days trained (scored on days 1..D); the stream has D+1.
        epochs_per_day: passes over a day's training set (the daily retrain's: over days 0..d).
        seeds: one stream and one set of arms per seed.
        max_users: users scored per day (drawn among day d+1's).
        overrides: ``--set`` overrides for every arm.
    """

    model_config = ConfigDict(extra="forbid")

    config: str = str(ROOT / "configs" / "synth-churn.yaml")
    users: int = Field(2_000, gt=0)
    items: int = Field(2_000, gt=0)
    events_per_day: int = Field(16_000, gt=0)
    days: int = Field(4, gt=0)
    epochs_per_day: int = Field(3, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    max_users: int = Field(1_500, gt=0)
    overrides: list[str] = Field(default_factory=lambda: ["model.user_cardinality=4000", "model.item_cardinality=1000"])

    def churn(self) -> ChurnConfig:
        """The same schedule as the churn benchmark's config (what ``run_day`` reads)."""
        return ChurnConfig(config=self.config, users=self.users, items=self.items, events_per_day=self.events_per_day,
                           days=self.days, epochs_per_day=self.epochs_per_day, seeds=self.seeds, overrides=self.overrides)


def retrain_day(cfg: DaysConfig, stream: ChurnStream, seed: int, runs_dir: Path, day: int):
    """A fresh run on every event of days 0..``day``; (run, compute)."""
    from training.config import load_config
    from training.jobs.train_retrieval import run as train

    run_cfg = load_config(cfg.config, [
        f"data.path={union_folder(stream, day)}", f"runs_dir={runs_dir}", f"seed={seed}",
        f"train.epochs={cfg.epochs_per_day}", "model.tables.eviction=ttl",
        f"model.tables.clock_hour={stream.day_start_hour[day]}", *cfg.overrides,
    ])
    t0 = time.perf_counter()
    run = train(run_cfg, run_id=f"retrain-seed{seed}-day{day}")
    wall_s = time.perf_counter() - t0
    return run, epoch_compute([m for m in run.read_metrics() if "train_s" in m and "epoch" in m], wall_s)


def run_seed(cfg: DaysConfig, seed: int, work: Path) -> dict[str, list[dict]]:
    """Every arm over every day of one seed's stream: ``{arm: [day record, ...]}``."""
    from training.config import load_config
    from training.runs import run_dir

    stream = write_days(work / f"data-seed{seed}", cfg.users, cfg.items, cfg.events_per_day, cfg.days, seed)
    runs_dir = work / f"runs-seed{seed}"
    shutil.rmtree(runs_dir, ignore_errors=True)  # a seed cut short starts over: no run resumes a stale day
    history_len = load_config(cfg.config, cfg.overrides).data.history_len
    records: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    frozen = None
    for day in range(cfg.days):
        truth = DayTruth.build(stream, day, history_len, cfg.max_users, seed)

        def scored(run) -> dict[str, float]:
            return truth.score(latest_checkpoint(run), load_config(run.config_path))

        run, compute = retrain_day(cfg, stream, seed, runs_dir, day)
        records["daily_retrain"].append({"day": day, **scored(run), "compute": compute})
        if frozen is None:
            frozen, frozen_compute = run, compute
        records["frozen"].append({"day": day, **scored(frozen),
                                  "compute": frozen_compute if day == 0 else dict.fromkeys(COMPUTE, 0.0)})
        for arm in ("continual", "continual_no_eviction"):
            churn = run_day(cfg.churn(), stream, EVICTION[arm], seed, runs_dir, day)
            run = run_dir(runs_dir, arm_run_id(EVICTION[arm], seed))
            stale = {k: v for k, v in churn.items() if "/" in k}  # per table: stale rows, no own row, ...
            records[arm].append({"day": day, **scored(run), **stale, "compute": churn["compute"]})
        line = ", ".join(f"{arm} {records[arm][-1]['event_recall@10']:.4f}/{records[arm][-1]['true_ndcg@10']:.4f}"
                         for arm in ARMS)
        print(f"  seed {seed} day {day} (event recall@10 / true ndcg@10): {line}", flush=True)
    return records


def days_rows(cfg: DaysConfig, work: Path) -> tuple[list[dict], dict]:
    """Run every seed under ``work`` (a running Ray is used); (rows, details for the report).

    Each finished seed's records are kept in ``work/records-seed<s>.json`` and read back instead
    of rerun when the same config finds them there: a run cut short resumes at its next seed."""
    per_seed, written = [], {}
    for seed in cfg.seeds:
        done = work / f"records-seed{seed}.json"
        kept = json.loads(done.read_text()) if done.exists() else {}
        if kept.get("config") != cfg.model_dump():
            kept = {"config": cfg.model_dump(), "records": run_seed(cfg, seed, work)}
            done.write_text(json.dumps(kept))
        written[seed] = dt.datetime.fromtimestamp(done.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        per_seed.append({**kept["records"], **reference_records(cfg, seed, work)})
    return aggregate(per_seed, cfg), {"config": cfg.model_dump(), "records": per_seed, "records_written": written}


def reference_records(cfg: DaysConfig, seed: int, work: Path) -> dict[str, list[dict]]:
    """Popularity and random top 10s on the seed's stream, scored like the arms, every day
    (no training: cheap, so recomputed rather than kept)."""
    from training.config import load_config

    stream = write_days(work / f"data-seed{seed}", cfg.users, cfg.items, cfg.events_per_day, cfg.days, seed)
    history_len = load_config(cfg.config, cfg.overrides).data.history_len
    out: dict[str, list[dict]] = {name: [] for name in REFERENCES}
    for day in range(cfg.days):
        for name, record in DayTruth.build(stream, day, history_len, cfg.max_users, seed).references(seed).items():
            out[name].append({"day": day, **record})
    return out


def aggregate(per_seed: list[dict[str, list[dict]]], cfg: DaysConfig) -> list[dict]:
    """Rows: per arm and day, mean and SE over seeds of every figure (per-seed values in
    ``params.values``; quality as ``recall@10`` / ``ndcg@10`` with ``target`` ``true_pref`` or
    ``next_day_event``, the results spec's names); per arm, the compute summed over the days (``day="all"``); paired
    differences continual - other per day and averaged over days 1.. (``day="after_0"``: on day 0
    every arm is the same model trained the same way)."""
    params = {"users": cfg.users, "items": cfg.items, "events_per_day": cfg.events_per_day,
              "epochs_per_day": cfg.epochs_per_day, "max_users": cfg.max_users, "overrides": cfg.overrides}
    out = []

    def add(system: str, key: str, values: list[float], **extra) -> None:
        metric, target = spec_name(key)
        for stat, value in (("mean", statistics.fmean(values)), ("se", standard_error(values))):
            out.append(row(system, DATASET, metric, value, **target, **extra, stat=stat, seeds=len(values),
                           values=[round(v, 5) for v in values], **params))
            if value is not None:  # row() keeps 3 decimals; a paired difference needs more
                out[-1]["value"] = round(value, 5)

    for arm in ARMS:
        tag = {"arm": arm, "eviction": EVICTION[arm]}
        for day in range(cfg.days):
            keys = [k for k in per_seed[0][arm][day] if k not in ("day", "compute", "users", "event_users")]
            for key in keys:
                table, metric = key.split("/") if "/" in key else (None, key)
                add(SYSTEM[arm], metric, [s[arm][day][key] for s in per_seed], **tag, day=day,
                    **({"table": table} if table else {}))
        for key in COMPUTE:
            add(SYSTEM[arm], key, [sum(r["compute"][key] for r in s[arm]) for s in per_seed], **tag, day="all")
    for name in REFERENCES:
        for day in range(cfg.days):
            for key in (*QUALITY, "truth_cold_share@10"):
                add(name, key, [s[name][day][key] for s in per_seed], arm=name, day=day)
    for other in ("frozen", "daily_retrain", "continual_no_eviction", *REFERENCES):
        for day in range(cfg.days):
            for key in QUALITY:
                add("continual", f"{key}_minus", [s["continual"][day][key] - s[other][day][key] for s in per_seed],
                    arm="continual", minus=other, day=day)
        for key in QUALITY:  # the mean over days 1.. (day 0 is one model for every arm), paired by seed
            add("continual", f"{key}_minus", [statistics.fmean(s["continual"][d][key] - s[other][d][key]
                                                               for d in range(1, cfg.days)) for s in per_seed],
                arm="continual", minus=other, day="after_0")
    return out

