"""TTL eviction in real training: the two-tower trained day by day over a churning stream, with
and without eviction, its stale rows and its next-day quality (``bench_training.py --parts churn``).

What it answers (issue #26): when the MPZCH tables have fewer rows than the ids a stream shows
over its lifetime, does TTL eviction keep the rows for the ids that are live, and what does it
cost or buy in quality? Two arms, same stream, same seed, same config but
``model.tables.eviction``: ``ttl`` and ``none``.

Each arm is one run of the real job (``training/jobs/train_retrieval.py``: Ray Train, 2 workers,
DMP row-wise tables, sharded DCP checkpoints). Day d re-runs the same run id on day d's dataset
folder (benchmarks/churn_days.py) with ``train.epochs`` raised by ``epochs_per_day``: the job's
resume path restores day d-1's checkpoint (tables, identities, optimizer state) and trains on.
``model.tables.clock_hour`` pins the MPZCH clock to the start of day d, so TTLs run on the
data's time. After each day, from the run:

- ``recall@10``, ``ndcg@10``: the job's validation metrics on day d+1's held-out events (full
  ranking over the catalogue born by then, day d's items masked);
- per table, from the day's committed checkpoint (identities read with DCP) and the stream:
  ``stale_row_share`` = rows held by ids whose TTL has passed (last trained on more than
  ``ttl_hours`` before day d's clock) / rows; ``no_own_row_share`` = day d's distinct ids that
  hold no row after the day; ``occupied_share``;
- ``evictions``: the job's own counter (rows reassigned, hence reset) over the day.

Rows (benchmark ``training``, dataset ``synth-churn``): mean and standard error over seeds,
params ``eviction``, ``day`` (trained on; quality measured on day+1), ``table``, ``stat``.

Example::

    rows = churn_rows(ChurnConfig(days=2, users=2_000, items=800, events_per_day=3_000, seeds=[0]), Path("/tmp/c"))
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from churn_days import ChurnStream, write_days
from results import row

ROOT = Path(__file__).resolve().parents[1]
DATASET = "synth-churn"
ARMS = ("ttl", "none")
TABLES = ("user", "item")
TABLE_METRICS = ("stale_row_share", "no_own_row_share", "occupied_share", "evictions")


class ChurnConfig(BaseModel):
    """The stream, the schedule and the seeds; the model and tables come from ``config``.

    Args:
        config: the run config (``configs/synth-churn.yaml``: table rows, TTL, batch, workers).
        users / items: U and I of the synthetic world (``training.data.synth``).
        events_per_day: events in each simulated day.
        days: D days trained; the stream has D+1 (the last only scores day D-1).
        epochs_per_day: passes over each day's events.
        seeds: one stream and one pair of runs per seed (data and model seeds alike).
        overrides: extra ``--set`` overrides for both arms (tests shrink the tables with them).
    """

    model_config = ConfigDict(extra="forbid")

    config: str = str(ROOT / "configs" / "synth-churn.yaml")
    users: int = Field(20_000, gt=0)
    items: int = Field(4_000, gt=0)
    events_per_day: int = Field(6_000, gt=0)
    days: int = Field(5, gt=0)
    epochs_per_day: int = Field(1, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- one arm
def run_arm(cfg: ChurnConfig, stream: ChurnStream, eviction: str, seed: int, runs_dir: Path) -> list[dict]:
    """Train one arm day by day (one resumed run of the job per day); a record per day."""
    return [run_day(cfg, stream, eviction, seed, runs_dir, day) for day in range(len(stream.folders))]


def run_day(cfg: ChurnConfig, stream: ChurnStream, eviction: str, seed: int, runs_dir: Path, day: int) -> dict:
    """Day ``day`` of one arm: resume the arm's run on the day's folder for ``epochs_per_day``
    more epochs; the day's record (quality on day+1, stale rows, evictions, compute)."""
    from training.config import load_config
    from training.jobs.train_retrieval import run as train

    run_cfg = load_config(cfg.config, [
        f"data.path={stream.folders[day]}", f"runs_dir={runs_dir}", f"seed={seed}",
        f"train.epochs={(day + 1) * cfg.epochs_per_day}", f"model.tables.eviction={eviction}",
        f"model.tables.clock_hour={stream.day_start_hour[day]}", *cfg.overrides,
    ])
    t0 = time.perf_counter()
    run = train(run_cfg, run_id=arm_run_id(eviction, seed))  # same id: resumes yesterday's checkpoint
    wall_s = time.perf_counter() - t0
    epochs = [m for m in run.read_metrics() if "valid/recall@10" in m]
    today = [m for m in epochs if m["epoch"] >= day * cfg.epochs_per_day]
    record = day_record(run, stream, day, today, run_cfg.model.tables.ttl_hours)
    print(f"  {eviction:>4} seed {seed} day {day}: recall@10 {record['recall@10']:.4f}, stale rows "
          f"user {record['user/stale_row_share']:.3f} item {record['item/stale_row_share']:.3f}, "
          f"no own row user {record['user/no_own_row_share']:.3f} item {record['item/no_own_row_share']:.3f}",
          flush=True)
    return {**record, "compute": epoch_compute(today, wall_s)}


def day_record(run, stream: ChurnStream, day: int, epochs: list[dict], ttl_hours: int) -> dict:
    """What a day's job call left: its own valid figures (last epoch of ``epochs``, the call's
    epoch metrics) and, per table, stale rows, ids without a row, occupancy and evictions."""
    identities = checkpoint_identities(latest_checkpoint(run))
    record = {"day": day, "recall@10": epochs[-1]["valid/recall@10"], "ndcg@10": epochs[-1]["valid/ndcg@10"]}
    for table in TABLES:
        measures = table_measures(identities[table], stream, table, day, ttl_hours)
        measures["evictions"] = sum(m.get(f"mpzch/{table}/evictions", 0) for m in epochs)
        record.update({f"{table}/{k}": v for k, v in measures.items()})
    return record


def arm_run_id(eviction: str, seed: int) -> str:
    """The run id one arm's days share (each day resumes it)."""
    return f"churn-{eviction}-seed{seed}"


def epoch_compute(epochs: list[dict], wall_s: float) -> dict[str, float]:
    """What a job call's epochs cost: loop seconds (``train_s``, rank 0), examples processed
    over all workers, and the call's wall seconds (Ray Train start, data, eval, checkpoints)."""
    return {"train_s": sum(m["train_s"] for m in epochs),
            "examples": round(sum(m["examples_per_s"] * m["train_s"] for m in epochs)), "wall_s": wall_s}


def latest_checkpoint(run) -> Path:
    """The run's newest committed checkpoint folder (a local run)."""
    from training.checkpoint import is_complete

    return Path([f for f in run.checkpoint_folders() if is_complete(f)][-1])


def checkpoint_identities(directory: Path) -> dict[str, np.ndarray]:
    """``{table: [S] ids held by each row, -1 empty}`` from a sharded DCP checkpoint, read in
    this process without the model (the rank shards concatenate in row order)."""
    import torch
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    keys = {key.split(".")[-2]: key for key in metadata.state_dict_metadata if key.endswith("._hash_zch_identities")}
    state = {key: torch.empty(metadata.state_dict_metadata[key].size, dtype=torch.int64) for key in keys.values()}
    dcp.load(state, checkpoint_id=str(directory))
    return {table: state[key].view(-1).numpy() for table, key in keys.items()}


def table_measures(identities: np.ndarray, stream: ChurnStream, table: str, day: int, ttl_hours: int) -> dict[str, float]:
    """Stale rows, the day's ids without a row, and occupancy of one table after day ``day``.

    Stale is the kernel's own rule: an id last trained on day s carries expiry
    ``hour(s) + ttl_hours`` and may be evicted once the clock passes it, so at day d's clock
    its row is stale when ``24 (d - s) > ttl_hours``. Reading it from the stream rather than the
    table's metadata measures both arms the same way (without eviction no expiry is kept).
    """
    ids_by_day = stream.user_ids if table == "user" else stream.item_ids
    held = identities[identities != -1]  # [H]
    last_day = np.full(held.shape, -1, dtype=np.int64)
    for s in range(day + 1):  # ascending: the last day an id was trained on wins
        last_day[np.isin(held, ids_by_day[s])] = s
    stale = (last_day >= 0) & (24 * (day - last_day) > ttl_hours)
    return {
        "stale_row_share": float(stale.sum()) / identities.size,
        "no_own_row_share": float((~np.isin(ids_by_day[day], held)).mean()),
        "occupied_share": held.size / identities.size,
    }


# ---------------------------------------------------------------- both arms, every seed
def churn_rows(cfg: ChurnConfig, work: Path) -> list[dict]:
    """Run both arms for every seed under ``work`` and aggregate them into result rows.

    Needs a running Ray (or starts a local one through the job's launcher)."""
    records: dict[str, list[list[dict]]] = {arm: [] for arm in ARMS}
    for seed in cfg.seeds:
        stream = write_days(work / f"data-seed{seed}", cfg.users, cfg.items, cfg.events_per_day, cfg.days, seed)
        for arm in ARMS if seed % 2 == 0 else ARMS[::-1]:  # alternate which arm goes first
            records[arm].append(run_arm(cfg, stream, arm, seed, work / "runs"))
    return aggregate(records, cfg)


def aggregate(records: dict[str, list[list[dict]]], cfg: ChurnConfig) -> list[dict]:
    """Mean and standard error over seeds of every per-day figure, as ``training`` rows."""
    from training.config import load_config

    run_cfg = load_config(cfg.config, cfg.overrides)
    tables = run_cfg.model.tables
    stream = {"users": cfg.users, "items": cfg.items, "events_per_day": cfg.events_per_day,
              "epochs_per_day": cfg.epochs_per_day, "ttl_hours": tables.ttl_hours, "workers": run_cfg.scaling.num_workers,
              "user_rows": table_rows(run_cfg, "user"), "item_rows": table_rows(run_cfg, "item"), "part": "churn"}
    out = []
    for arm, per_seed in records.items():
        for day in range(cfg.days):
            keys = [k for k in per_seed[0][day] if k not in ("day", "compute")]
            for key in keys:
                values = [seed_records[day][key] for seed_records in per_seed]
                table, metric = key.split("/") if "/" in key else (None, key)
                extra = {"table": table} if table else {}
                for stat, value in (("mean", statistics.fmean(values)), ("se", standard_error(values))):
                    out.append(row("rayrec", DATASET, metric, value, eviction=arm, day=day, **extra, stat=stat,
                                   seeds=len(values), values=[round(v, 4) for v in values], **stream))
    return out


def table_rows(run_cfg, table: str) -> int:
    """Rows of a two-tower table as the job builds it."""
    from training.models.two_tower import table_specs

    return next(spec.rows for spec in table_specs(run_cfg.model) if spec.name == table)


def standard_error(values: list[float]) -> Optional[float]:
    """SE of the mean (None for a single seed)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


# ---------------------------------------------------------------- report (from the rows alone)
def churn_series(rows: list[dict], metric: str, table: Optional[str] = None) -> dict[str, list[tuple[int, float, float]]]:
    """``{arm: [(day, mean, se or 0), ...]}`` of one metric from the JSON rows."""
    picked = [r for r in rows if r["dataset"] == DATASET and r["metric"] == metric and r["params"].get("table") == table]
    out: dict[str, list[tuple[int, float, float]]] = {}
    for arm in ARMS:
        mean = {r["params"]["day"]: r["value"] for r in picked if r["params"]["eviction"] == arm and r["params"]["stat"] == "mean"}
        se = {r["params"]["day"]: r["value"] or 0.0 for r in picked if r["params"]["eviction"] == arm and r["params"]["stat"] == "se"}
        out[arm] = [(d, mean[d], se.get(d, 0.0)) for d in sorted(mean)]
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Stale-row share per table and Recall@10 per day, both arms (error bars: SE over seeds)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("stale_row_share", "user", "user table: stale-row share"),
              ("stale_row_share", "item", "item table: stale-row share"),
              ("recall@10", None, "Recall@10 on the next day")]
    for ax, (metric, table, title) in zip(axes, panels):
        for arm, style in (("ttl", "o-"), ("none", "s--")):
            points = churn_series(rows, metric, table)[arm]
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt=style,
                        capsize=3, label=f"eviction={arm}")
        ax.set_title(title)
        ax.set_xlabel("day trained (Recall: scored on the day after)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_section(rows: list[dict], image: str) -> list[str]:
    """The report's churn section (tables of means ± SE per day), from the rows alone."""
    churn = [r for r in rows if r["dataset"] == DATASET]
    if not churn:
        return []
    p = churn[0]["params"]
    seeds = p["seeds"]

    def cell(metric: str, table: Optional[str], arm: str, day: int, digits: int = 3) -> str:
        points = {d: (m, s) for d, m, s in churn_series(churn, metric, table)[arm]}
        mean, se = points[day]
        return f"{mean:.{digits}f} ± {se:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"

    days = sorted({r["params"]["day"] for r in churn})
    lines = [
        "## TTL eviction in real training: stale rows and quality over simulated days",
        "",
        f"The two-tower (`{Path(p.get('config', 'configs/synth-churn.yaml')).name}`), 2 Ray Train workers, trained "
        f"one simulated day at a time over a churning synthetic stream ({p['users']:,} users, {p['items']:,} items "
        f"of which 70% are born during the stream, {p['events_per_day']:,} events a day, "
        f"{p['epochs_per_day']} epoch a day; benchmarks/churn_days.py). Day d resumes day d-1's checkpoint "
        "(the job's own resume path, same run id) on day d's events with the MPZCH clock pinned to day d "
        f"(`model.tables.clock_hour`), TTL {p['ttl_hours']} h. The tables are smaller than the ids the stream "
        f"shows: user {p['user_rows']:,} rows, item {p['item_rows']:,} rows. Two arms, same streams and seeds: "
        f"`eviction=ttl` and `eviction=none`. Mean ± standard error over {seeds} seed(s) "
        "(benchmarks/mpzch_churn_training.py).",
        "",
        "- stale-row share: rows held by ids whose TTL has passed at that day's clock / rows;",
        "- no own row: that day's distinct ids that hold no row after the day (they share fallback rows);",
        "- Recall@10 / NDCG@10: on day d+1's held-out events (each user's first event on an item not seen "
        "on day d), full ranking over the catalogue born by then.",
        "",
        f"![stale rows and recall per day]({image})",
        "",
        "| day | stale rows, user (ttl / none) | stale rows, item (ttl / none) | no own row, user (ttl / none) "
        "| no own row, item (ttl / none) | evictions user + item (ttl) | Recall@10 (ttl / none) | NDCG@10 (ttl / none) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in days:
        evicted = sum(m for t in TABLES for dd, m, _ in churn_series(churn, "evictions", t)["ttl"] if dd == d)
        lines.append(
            f"| {d} | {cell('stale_row_share', 'user', 'ttl', d)} / {cell('stale_row_share', 'user', 'none', d)} "
            f"| {cell('stale_row_share', 'item', 'ttl', d)} / {cell('stale_row_share', 'item', 'none', d)} "
            f"| {cell('no_own_row_share', 'user', 'ttl', d)} / {cell('no_own_row_share', 'user', 'none', d)} "
            f"| {cell('no_own_row_share', 'item', 'ttl', d)} / {cell('no_own_row_share', 'item', 'none', d)} "
            f"| {evicted:,.0f} | {cell('recall@10', None, 'ttl', d)} / {cell('recall@10', None, 'none', d)} "
            f"| {cell('ndcg@10', None, 'ttl', d)} / {cell('ndcg@10', None, 'none', d)} |"
        )
    lines += ["", quality_verdict(churn), ""]
    return lines


def quality_verdict(churn: list[dict]) -> str:
    """Which arm retrieves better on the days where eviction happened, from per-seed values:
    the seed-paired difference in Recall@10 (ttl - none) averaged over those days, ± its SE."""
    evicting = sorted({r["params"]["day"] for r in churn if r["metric"] == "evictions" and r["params"]["eviction"] == "ttl"
                       and r["params"]["stat"] == "mean" and r["value"] and r["value"] > 0})
    if not evicting:
        return "No row was evicted on any day, so the two arms trained identically."
    per_seed, per_day = {}, {}
    for arm in ARMS:
        picked = sorted((r for r in churn if r["metric"] == "recall@10" and r["params"]["eviction"] == arm
                         and r["params"]["stat"] == "mean" and r["params"]["day"] in evicting), key=lambda r: r["params"]["day"])
        per_day[arm] = np.array([r["params"]["values"] for r in picked])  # [days, seeds]
        per_seed[arm] = per_day[arm].mean(axis=0)  # [seeds] mean over those days
    none_ahead = int((per_day["none"] > per_day["ttl"]).sum())
    diff = per_seed["ttl"] - per_seed["none"]  # [seeds]
    mean, se = float(diff.mean()), standard_error(diff.tolist())
    spread = f" ± {se:.4f} (SE over {diff.size} seeds)" if se is not None else " (1 seed, no SE)"
    if se is None:
        verdict = "one seed, so no verdict on which arm is ahead"
    elif abs(mean) <= 2 * se:
        verdict = "**neither arm is ahead** beyond twice the SE"
    else:
        verdict = (f"**{'TTL eviction' if mean > 0 else 'no eviction'} is ahead on quality** "
                   f"({abs(mean) / se:.1f} SE; with {diff.size} seeds read it as a direction, not a precise size)")
    return (f"On the days with evictions (days {', '.join(map(str, evicting))}), Recall@10 with TTL eviction minus "
            f"without, paired by seed: {mean:+.4f}{spread}: {verdict}. Mean Recall@10 over those days: "
            f"{per_seed['ttl'].mean():.4f} (ttl) vs {per_seed['none'].mean():.4f} (none). No eviction scored higher "
            f"in {none_ahead} of the {per_day['ttl'].size} (day, seed) pairs.")
