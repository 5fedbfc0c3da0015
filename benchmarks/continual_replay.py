"""Replay in continual training (``continual.replay``): does mixing older interactions into each
``rayrec train --continue`` help, on the ``days`` part's streams?

Run: ``.venv/bin/python benchmarks/continual_replay.py --days-work DIR [--replays 1 4]`` where DIR
is a finished ``bench_continual.py --parts days --days-work DIR`` folder (its streams, its day-0
runs and its records). Writes ``docs/benchmarks/continual_replay.md`` and ``.json`` (format:
``/work/shared/specs/benchmark-results.md``, benchmark ``continual``).

Per seed and replay ratio R: a copy of the continual arm's day-0 run (the same model every arm
starts from), then days 1..D-1 exactly as the continual arm runs them
(``continual_days.continue_day``: that day's clicks as a feedback part, ``rayrec train
--continue`` with TTL eviction and the MPZCH clock on day d) with ``continual.replay=R``, each
day's version scored on day d+1 by the same ``DayTruth``. Compared, paired by seed and day, with
R = 0 trained again in this command (the control: the same code, the same run), and with the
days part's own records of the continual and daily-retrain arms (the same streams, day-0 model
and scoring; trained in the days part's command, its commit and date in continual.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results import git_commit, machine, mean_se, provenance, row  # noqa: E402

OUT_DIR = ROOT / "docs" / "benchmarks"
KEYS = ("true_ndcg@10", "true_recall@10", "event_recall@10", "event_ndcg@10")
DATASET = "synth-churn"


def replay_seed(cfg, seed: int, work: Path, replay: float) -> list[dict]:
    """Days 1..D-1 of the continual arm with ``continual.replay=replay``: a record per day."""
    from churn_days import write_days
    from continual_days import continue_day
    from day_scorer import DayTruth
    from mpzch_churn_training import arm_run_id, latest_checkpoint
    from training.config import load_config

    stream = write_days(work / f"data-seed{seed}", cfg.users, cfg.items, cfg.events_per_day, cfg.days, seed, cfg.clicks)
    runs_dir = work / f"replay{replay:g}-runs-seed{seed}"
    feedback = work / f"replay{replay:g}-feedback-seed{seed}"
    shutil.rmtree(runs_dir, ignore_errors=True)
    shutil.rmtree(feedback, ignore_errors=True)
    day0 = arm_run_id("ttl", seed)
    shutil.copytree(work / f"runs-seed{seed}" / day0, runs_dir / day0)
    history_len = load_config(cfg.config, cfg.overrides).data.history_len
    records = []
    for day in range(1, cfg.days):
        run, record = continue_day(cfg, stream, "ttl", seed, runs_dir, feedback, day, [f"continual.replay={replay}"])
        truth = DayTruth.build(stream, day, history_len, cfg.max_users, seed)
        records.append({"day": day, **truth.score(latest_checkpoint(run), load_config(run.config_path)),
                        "compute": record["compute"]})
        print(f"  seed {seed} replay {replay:g} day {day}: " + ", ".join(f"{k} {records[-1][k]:.4f}" for k in KEYS), flush=True)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days-work", required=True, help="a finished days part folder (records-seed<s>.json, runs, streams)")
    parser.add_argument("--replays", type=float, nargs="+", default=[0.0, 1.0, 4.0],
                        help="continual.replay values tried (0: the control, trained again in this command)")
    args = parser.parse_args()
    work = Path(args.days_work)

    import ray

    from continual_days import DaysConfig

    kept = {int(p.stem.removeprefix("records-seed")): json.loads(p.read_text()) for p in sorted(work.glob("records-seed*.json"))}
    if not kept:
        raise SystemExit(f"{work}: no records-seed<s>.json (run bench_continual.py --parts days --days-work {work} first)")
    cfg = DaysConfig.model_validate({**next(iter(kept.values()))["config"], "seeds": sorted(kept)})
    start = machine()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    try:
        runs = {r: {seed: replay_seed(cfg, seed, work, r) for seed in cfg.seeds} for r in args.replays}
    finally:
        ray.shutdown()

    def reference(other: str, seed: int, day: int, key: str) -> float:
        if other == "replay_0":  # this command's own R = 0 arm
            return runs[0.0][seed][day - 1][key]
        return kept[seed]["records"][other][day][key]

    others = (*(["replay_0"] if 0.0 in runs else []), "continual", "daily_retrain")
    rows = []
    for r, per_seed in runs.items():
        for key in KEYS:
            for other in others:
                # per seed: the mean over days 1.. of (replay - other), paired by day
                diffs = [statistics.fmean(per_seed[s][d - 1][key] - reference(other, s, d, key)
                                          for d in range(1, cfg.days)) for s in cfg.seeds]
                mean, se = mean_se(diffs)
                rows.append(row("continual", DATASET, f"{key}_minus", mean, replay=r, minus=other, day="after_0",
                                stat="mean", se=se, seeds=len(diffs), values=[round(v, 5) for v in diffs]))
                rows[-1]["value"] = round(mean, 5)
            level = [statistics.fmean(per_seed[s][d - 1][key] for d in range(1, cfg.days)) for s in cfg.seeds]
            mean, se = mean_se(level)
            rows.append(row("continual", DATASET, key, mean, replay=r, day="after_0", stat="mean", se=se, seeds=len(level)))
        # the feedback events trained (the same for every R: replayed rows are not events; each
        # step of R > 0 trains 1 + R times as many rows)
        events = [sum(rec["compute"]["examples"] for rec in per_seed[s]) for s in cfg.seeds]
        rows.append(row("continual", DATASET, "feedback_events_trained", statistics.fmean(events), replay=r, day="all_after_0"))
    report = {"benchmark": "continual", "part": "replay", "command": "python benchmarks/continual_replay.py " + " ".join(sys.argv[1:]),
              "git_commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "machine": start, "days_config": cfg.model_dump(), "rows": rows,
              "records": {str(r): {str(s): v for s, v in per.items()} for r, per in runs.items()}}
    (OUT_DIR / "continual_replay.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report)


def write_markdown(report: dict) -> None:
    lines = [
        "# Continual training with replay (`continual.replay`)",
        "",
        provenance(report),
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "Mean over days 1-3 of each seed, then mean ± SE over the seeds; differences paired by seed and day.",
        "",
        "| replay per new positive | metric | continual with replay | minus replay 0 (this command) | minus continual (days part) | minus daily full retrain (days part) |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r["params"]["replay"], r["metric"], r["params"].get("minus")): r for r in report["rows"]}

    def cell(r: dict) -> str:
        se = r["params"].get("se")
        return f"{r['value']:.4f} ± {se:.4f}" if se is not None else f"{r['value']:.4f}"

    for replay in sorted({r["params"]["replay"] for r in report["rows"]}):
        for key in KEYS:
            vs_zero = by.get((replay, key + "_minus", "replay_0"))
            lines.append(f"| {replay:g} | {key} | {cell(by[(replay, key, None)])} | {cell(vs_zero) if vs_zero else '-'} | "
                         f"{cell(by[(replay, key + '_minus', 'continual')])} | {cell(by[(replay, key + '_minus', 'daily_retrain')])} |")
    lines.append("")
    (OUT_DIR / "continual_replay.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
