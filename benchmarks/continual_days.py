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
- ``continual``: day 0 an ordinary run, then each day ``rayrec train --continue`` on that day's
  events as a feedback part (:func:`continue_day`: ``epochs_per_day`` epochs, TTL eviction on, the
  MPZCH clock on day d);
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
from mpzch_churn_training import ChurnConfig, arm_run_id, day_record, epoch_compute, latest_checkpoint, run_day, standard_error
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
        continual_batch: ``continual.batch_size`` of the continual arms (the config's train batch).
        clicks: train and score on the clicked exposures only (``churn_days.read_stream``);
            ``events_per_day`` counts exposures.
        seeds: one stream and one set of arms per seed.
        max_users: users scored per day (drawn among day d+1's).
        overrides: ``--set`` overrides for every arm.
    """

    model_config = ConfigDict(extra="forbid")

    config: str = str(ROOT / "configs" / "synth-churn.yaml")
    users: int = Field(8_000, gt=0)
    items: int = Field(2_000, gt=0)
    events_per_day: int = Field(16_000, gt=0)
    days: int = Field(4, gt=0)
    epochs_per_day: int = Field(3, gt=0)
    continual_batch: int = Field(128, gt=0)
    clicks: bool = True
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    max_users: int = Field(1_500, gt=0)
    overrides: list[str] = Field(default_factory=lambda: ["model.user_cardinality=4000", "model.item_cardinality=2400"])

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


def continue_day(cfg: DaysConfig, stream: ChurnStream, eviction: str, seed: int, runs_dir: Path, feedback: Path,
                 day: int, overrides: tuple[str, ...] | list[str] = ()):  # fmt: skip
    """Day ``day`` of a continual arm, as the product does it; (the arm's newest version, record).

    Day 0 is an ordinary run on day 0's folder (``run_day``). Every later day appends the day's
    events to the arm's feedback log as one compacted part of clicks, the way serving's sink
    writes them, and runs ``rayrec train --continue`` on the arm's run
    (:func:`training.jobs.continue_retrieval.continue_run`): the events past the watermark are
    the positives, histories come from everything trained so far plus the new events, MPZCH
    admits the new ids with the clock on day d, and the next version is exported. ``overrides``
    go to every ``--continue`` (``benchmarks/continual_replay.py``: ``continual.replay``)."""
    from training.config import load_config
    from training.jobs.continue_retrieval import continue_run
    from training.runs import run_dir

    if day == 0:
        churn = run_day(cfg.churn(), stream, eviction, seed, runs_dir, day)
        return run_dir(runs_dir, arm_run_id(eviction, seed)), churn
    write_clicks(stream.folders[day] / "interactions" / "train.parquet", feedback, day)
    t0 = time.perf_counter()
    done = continue_run(str(run_dir(runs_dir, arm_run_id(eviction, seed)).location), str(feedback), [
        f"continual.epochs={cfg.epochs_per_day}", f"continual.batch_size={cfg.continual_batch}",
        f"model.tables.clock_hour={stream.day_start_hour[day]}", *overrides,
    ])
    wall_s = time.perf_counter() - t0
    epochs = [m for m in done.run.read_metrics() if "train_s" in m and "epoch" in m]
    record = day_record(done.run, stream, day, epochs, load_config(done.run.config_path).model.tables.ttl_hours)
    compute = {"train_s": sum(m["train_s"] for m in epochs), "examples": sum(m["feedback_events"] for m in epochs),
               "wall_s": wall_s}
    return done.run, {**record, "compute": compute}


def write_clicks(events: Path, feedback: Path, day: int) -> str:
    """A day's events as one compacted feedback part of clicks (``part-<ms>-<id>.parquet``, the
    columns training reads: ``training.data.feedback.EVENT_COLUMNS``); returns its name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from training.data.feedback import EVENT_COLUMNS

    table = pq.read_table(events, columns=["user_id", "item_id", "timestamp"])
    n = table.num_rows
    ts = table.column("timestamp").to_numpy()
    part = pa.table({
        "event_id": pa.array([f"day{day}-{k:08d}" for k in range(n)]), "user_id": table.column("user_id"),
        "item_id": table.column("item_id"), "event": pa.array(["click"] * n), "timestamp": table.column("timestamp"),
        "received_ms": pa.array(ts * 1000, pa.int64()),
    }, schema=EVENT_COLUMNS)
    feedback.mkdir(parents=True, exist_ok=True)
    name = f"part-{int(ts.max()) * 1000:013d}-day{day}.parquet"
    pq.write_table(part, feedback / name)
    return name


def run_seed(cfg: DaysConfig, seed: int, work: Path) -> dict[str, list[dict]]:
    """Every arm over every day of one seed's stream: ``{arm: [day record, ...]}``."""
    from training.config import load_config

    stream = write_days(work / f"data-seed{seed}", cfg.users, cfg.items, cfg.events_per_day, cfg.days, seed, cfg.clicks)
    runs_dir = work / f"runs-seed{seed}"
    shutil.rmtree(runs_dir, ignore_errors=True)  # a seed cut short starts over: no run resumes a stale day
    for arm in ("continual", "continual_no_eviction"):  # nor trains a later day's part left in its log
        shutil.rmtree(work / f"feedback-seed{seed}-{arm}", ignore_errors=True)
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
            run, churn = continue_day(cfg, stream, EVICTION[arm], seed, runs_dir, work / f"feedback-seed{seed}-{arm}", day)
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
        same = {**cfg.model_dump(), "seeds": None}  # a seed's records do not depend on the other seeds run
        if {**kept.get("config", {}), "seeds": None} != same:
            kept = {"config": cfg.model_dump(), "records": run_seed(cfg, seed, work)}
            done.write_text(json.dumps(kept))
        written[seed] = dt.datetime.fromtimestamp(done.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        per_seed.append({**kept["records"], **reference_records(cfg, seed, work)})
    return aggregate(per_seed, cfg), {"config": cfg.model_dump(), "records": per_seed, "records_written": written}


def reference_records(cfg: DaysConfig, seed: int, work: Path) -> dict[str, list[dict]]:
    """Popularity and random top 10s on the seed's stream, scored like the arms, every day
    (no training: cheap, so recomputed rather than kept)."""
    from training.config import load_config

    stream = write_days(work / f"data-seed{seed}", cfg.users, cfg.items, cfg.events_per_day, cfg.days, seed, cfg.clicks)
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
              "epochs_per_day": cfg.epochs_per_day, "max_users": cfg.max_users, "overrides": cfg.overrides,
              "clicks": cfg.clicks, "continual_batch": cfg.continual_batch}
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

