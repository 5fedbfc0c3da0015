"""Reliability benchmark (``make chaos``): serving under killed replicas, rollouts, overload and a
killed feedback sink; training under a killed worker and a kill mid-checkpoint.

Run: ``.venv/bin/python benchmarks/chaos.py`` (``make chaos``), about 10-15 minutes on 2 shared
cores; ``--quick`` for a smoke run. Writes ``docs/benchmarks/reliability.md``,
``reliability.json`` (format: ``/work/shared/specs/benchmark-results.md``) and
``reliability_timeline.png`` (Markdown and plot: ``benchmarks/reliability_report.py``;
``--render`` rebuilds the Markdown from the JSON alone).

The serving scenarios use the newest ml-100k two-tower run under ``runs/`` (``make demo`` makes
one; configs/tiny.yaml is trained if there is none) and the newest ranker run (else the
heavy stand-in ranker and FM of tests/serving/, as ``make bench-serve`` does). Load goes over
real loopback HTTP through ``serving.client.RecommendClient`` (the retrying client rayrec
ships); replicas are SIGKILLed through ``serving.chaos``, the same code the short fault tests
in ``make test`` use (tests/reliability/).

Scenarios:
1. replica kills, 2 Ingress replicas (each retrieves and ranks) and 2 FM workers: kill one replica
   of the Ingress, FMWorker, FMCache and Predictor in turn under steady load;
2. the same kill of the Ingress with 1 replica (the cost of no spare);
3. rolling out a new checkpoint under load, with 2 replicas and with 1;
4. overload: 3x the measured saturation for ``overload_s`` seconds, with the memory of every
   Serve process sampled each second;
5. feedback: acknowledged ``/feedback`` events while the FeedbackSink is SIGKILLed: lost and
   duplicated events in the Parquet log afterwards;
6. training: the fault tests of tests/training/test_fault_tolerance.py (a worker SIGKILLed
   mid-epoch, a rank killed mid-checkpoint-save), run by pytest, with their wall time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serving import BenchConfig  # noqa: E402  (the serving benchmark's sizes)
from serve_app import STAND_IN, newest_ranker_run, newest_run, versions  # noqa: E402  (the app under test)
from reliability_report import OUT_DIR, TIMELINE_PNG, plot, write_markdown  # noqa: E402  (benchmarks/reliability_report.py)
from traffic import replay_users, run_load  # noqa: E402
from saturation import Bisection, sweep  # noqa: E402  (benchmarks/saturation.py)
from results import git_commit, machine, row  # noqa: E402

COMMAND = "make chaos  (.venv/bin/python benchmarks/chaos.py)"
PORT = 8376  # reliability's port range 8370-8379
DATASET = "ml-100k"


@dataclass(frozen=True)
class ChaosConfig:
    """Sizes of every scenario.

    Args:
        rate_per_s / concurrency: the steady load during replica kills and rollouts.
        after_s: seconds of load measured after each replacement.
        overload_factor / overload_s: the burst, as a multiple of saturation, and its length.
        feedback_batches / feedback_batch: acknowledged events sent, in batches.
        training: run the training fault tests (scenario 6).
    """

    rate_per_s: float = 10.0
    concurrency: int = 4
    warm_s: float = 5.0
    after_s: float = 5.0
    overload_factor: float = 3.0
    overload_s: float = 60.0
    feedback_batches: int = 40
    feedback_batch: int = 50
    training: bool = True


def settings(feedback_dir: Path, factory: str, ranker_run: Path | None, replicas: int):
    from serving.app import ServingSettings
    from serving.precompute import PrecomputeSettings

    return ServingSettings(
        feedback_dir=str(feedback_dir),
        models_factory=factory,
        ranker_run=str(ranker_run) if ranker_run else None,
        min_replicas=replicas,
        max_replicas=replicas,
        max_ongoing_requests=8,
        max_queued_requests=16,
        ingress_num_cpus=0,
        fm_worker_num_cpus=0,
        precompute=PrecomputeSettings(interval_s=0.1, users_per_cycle=16, workers=2),
    )


def successor(run_dir: Path, scratch: Path) -> Path:
    from serving.run_index import read_meta, resolve_dataset_dir

    """A copy of the run's serving artifact with a later version: the checkpoint to roll out."""
    new = scratch / f"{run_dir.name}-next"
    if new.exists():
        shutil.rmtree(new)
    shutil.copytree(run_dir / "index", new / "index")
    meta = new / "index" / "index.json"
    data = json.loads(meta.read_text())
    data["version"] = data["version"] + "-next"
    data["dataset"] = str(resolve_dataset_dir(read_meta(run_dir / "index"), run_dir / "index"))
    meta.write_text(json.dumps(data))
    return new


# ---------------------------------------------------------------- scenarios
def replica_kills(url: str, users: list[int], deployments: list[str], replicas: int, cfg: ChaosConfig,
                  rows: list, timeline: list) -> list[dict]:
    from serving.chaos import SteadyLoad, replica_fault

    reports = []
    with SteadyLoad(url, users, rate_per_s=cfg.rate_per_s, concurrency=cfg.concurrency) as load:
        time.sleep(cfg.warm_s)
        t0 = load.shots[0].start if load.shots else time.monotonic()
        kills = []
        for deployment in deployments:
            report = replica_fault(load, deployment, after_s=cfg.after_s)
            kills.append((deployment, time.monotonic() - cfg.after_s - report.replaced_s - t0))
            print(f"  kill {deployment} ({replicas} replicas): replaced in {report.replaced_s:.1f}s, "
                  f"success {report.during.success_rate:.3f}, first try {report.during.first_try_rate:.3f}, "
                  f"p99 {report.during.p99_ms} ms, hit recovered {report.hit_recovered_s}", flush=True)
            reports.append(report.as_dict())
            params = {"deployment": deployment, "replicas": replicas, "rate_per_s": cfg.rate_per_s}
            rows.extend([
                row("serve", DATASET, "success_rate_during_fault", report.during.success_rate, **params),
                row("serve", DATASET, "first_try_rate_during_fault", report.during.first_try_rate, **params),
                row("serve", DATASET, "p99_ms_during_fault", report.during.p99_ms, **params),
                row("serve", DATASET, "p99_ms_after_fault", report.after.p99_ms, **params),
                row("serve", DATASET, "recovery_s", report.replaced_s, **params),
            ])
            if report.hit_recovered_s is not None:
                rows.append(row("serve", DATASET, "hit_rate_recovery_s", report.hit_recovered_s, **params))
        timeline.append({"replicas": replicas, "t0": t0, "kills": kills,
                         "shots": [(s.start - t0, s.latency_ms, s.ok, s.fm_from_cache) for s in load.shots]})
    return reports


def rollout(run_dir: Path, new_run: Path, feedback_dir: Path, factory: str, ranker_run: Path | None, users: list[int],
            replicas: int, cfg: ChaosConfig, rows: list) -> dict:
    from serving.app import deploy_declaratively
    from serving.chaos import SteadyLoad

    url = deploy_declaratively(run_dir, settings(feedback_dir, factory, ranker_run, replicas), port=PORT)
    with SteadyLoad(url, users, rate_per_s=cfg.rate_per_s, concurrency=cfg.concurrency) as load:
        time.sleep(cfg.warm_s)
        start = time.monotonic()
        deploy_declaratively(new_run, settings(feedback_dir, factory, ranker_run, replicas), port=PORT)
        done = time.monotonic()
        time.sleep(cfg.after_s)
    during, after = load.window(start, done), load.window(done)
    out = {"replicas": replicas, "rollout_s": done - start, "during": during.as_dict(), "after": after.as_dict()}
    print(f"  rollout ({replicas} replicas) in {done - start:.1f}s: success {during.success_rate:.3f}, "
          f"first try {during.first_try_rate:.3f}, p99 {during.p99_ms} ms, failed {during.failed_statuses}", flush=True)
    params = {"replicas": replicas, "rate_per_s": cfg.rate_per_s}
    rows.extend([
        row("serve", DATASET, "rollout_success_rate", during.success_rate, **params),
        row("serve", DATASET, "rollout_first_try_rate", during.first_try_rate, **params),
        row("serve", DATASET, "rollout_p99_ms", during.p99_ms, **params),
        row("serve", DATASET, "rollout_s", done - start, **params),
    ])
    return out


def saturation_qps(url: str, users: list[int], bench: BenchConfig) -> float:
    """The path's saturation found as ``make bench-serve`` finds it (``saturation.Bisection``: open
    loop, doubling then bisecting to ±``bench.tolerance``), with 4 s levels: the overload step
    offers a multiple of what the path really keeps up with, not of a closed loop's rate."""
    systems = {"serve": Bisection(url, bench.start_qps, bench.tolerance)}
    sweep(systems, users, 4.0, bench.timeout_s)
    return systems["serve"].saturation


def overload(url: str, users: list[int], cfg: ChaosConfig, rows: list) -> dict:
    from serving.chaos import rss_mb, serve_pids

    bench = BenchConfig()
    sat = saturation_qps(url, users, bench)
    qps = cfg.overload_factor * max(sat, 1.0)
    pids = serve_pids()
    before = rss_mb(pids)
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(pids))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = run_load(url, [users[i % len(users)] for i in range(int(qps * cfg.overload_s))], qps, cfg.overload_s, bench.timeout_s)
    stop.set()
    sampler.join()
    # recovery: once the burst ends, a nominal load must be answered at once again
    t0 = time.monotonic()
    recovered = None
    while time.monotonic() - t0 < 60:
        probe = run_load(url, users[:10], 5, 2, bench.timeout_s)
        if all(s.status == 200 for s in probe.shots) and (probe.pct(99) or 1e9) < 1000:
            recovered = time.monotonic() - t0
            break
    time.sleep(2)
    after = rss_mb(pids)
    statuses = [s.status for s in result.shots]
    total = max(len(statuses), 1)
    stats = {
        "saturation_qps": sat, "offered_qps": qps, "seconds": cfg.overload_s, "requests": len(statuses),
        "share_2xx": sum(200 <= s < 300 for s in statuses) / total,
        "share_shed": sum(s in (429, 503) for s in statuses) / total,
        "responses_5xx_other": sum(500 <= s < 600 and s != 503 for s in statuses),
        "timeouts": sum(s in (0, 408) for s in statuses),
        "p99_ms_2xx": result.pct(99),
        "rss_mb_before": before, "rss_mb_peak": max(samples, default=before), "rss_mb_after": after,
        "recovery_s": recovered, "serve_processes": len(pids),
    }
    print(f"  overload: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in stats.items()})}", flush=True)
    params = {"offered_qps": round(qps, 1), "seconds": cfg.overload_s}
    rows.extend([
        row("serve", DATASET, "saturation_qps", sat),
        row("serve", DATASET, "share_2xx", stats["share_2xx"], **params),
        row("serve", DATASET, "responses_shed", stats["share_shed"] * total, of=total, **params),
        row("serve", DATASET, "responses_5xx", stats["responses_5xx_other"], of=total, **params),
        row("serve", DATASET, "rss_mb_peak_over_before", stats["rss_mb_peak"] / max(before, 1e-9), **params),
        row("serve", DATASET, "recovery_s", recovered, **params),
    ])
    return stats


def feedback_kill(url: str, log_dir: Path, cfg: ChaosConfig, rows: list) -> dict:
    from serving.chaos import kill_replica, wait_replaced
    from serving.client import RecommendClient, RequestFailed, RetryPolicy
    from serving.feedback_log import count_by_event_id, read_feedback

    acked: list[str] = []
    failed = 0
    killed_at = None
    with RecommendClient(url, RetryPolicy(max_attempts=8, deadline_s=30)) as client:
        for b in range(cfg.feedback_batches):
            events = [{"event_id": f"chaos-{b}-{i}", "user_id": 1 + i, "item_id": 1 + (b * 7 + i) % 1600,
                       "event": "click", "timestamp": 1_700_000_000 + b} for i in range(cfg.feedback_batch)]
            try:
                client.feedback(events)
                acked += [e["event_id"] for e in events]
            except RequestFailed:
                failed += 1
            if b == cfg.feedback_batches // 3:
                fault = kill_replica("FeedbackSink")
                killed_at = b
        wait_replaced(fault)
    # the replacement compacts the dead replica's WAL at start-up; wait for every acked event
    deadline = time.monotonic() + 60
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = count_by_event_id(read_feedback(log_dir))
        if all(e in counts for e in acked[: (killed_at + 1) * cfg.feedback_batch]):
            break
        time.sleep(1)
    # the rest are compacted on the live replica's schedule or at its shutdown
    from ray import serve

    serve.delete("rayrec")
    counts = count_by_event_id(read_feedback(log_dir))
    lost = sum(1 for e in acked if e not in counts)
    duplicates = sum(max(0, n - 1) for n in counts.values())
    stats = {"acked": len(acked), "batches_failed": failed, "killed_after_batch": killed_at,
             "acked_events_lost": lost, "duplicates": duplicates}
    print(f"  feedback: {stats}", flush=True)
    rows.extend([
        row("feedback", DATASET, "acked_events_lost", lost, acked=len(acked)),
        row("feedback", DATASET, "duplicates", duplicates, acked=len(acked)),
    ])
    return stats


def training_faults(rows: list) -> dict:
    """Run the training fault tests under pytest; their assertions are the guarantees."""
    out = {}
    for name, test in {
        "worker_killed_mid_epoch": "test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted_run",
        "killed_mid_checkpoint_save": "killed_while_saving",
    }.items():
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "tests/training/test_fault_tolerance.py", "-k", test],
            cwd=ROOT, capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        out[name] = {"passed": proc.returncode == 0, "wall_s": wall, "pytest": summary}
        print(f"  training {name}: {summary} ({wall:.0f}s)", flush=True)
        rows.append(row("train", DATASET, "resumed", 1.0 if proc.returncode == 0 else 0.0, scenario=name, wall_s=round(wall, 1)))
    return out


# ---------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT / "data" / "ml-100k"))
    parser.add_argument("--run", default=None, help="run folder (default: newest ml-100k run under runs/)")
    parser.add_argument("--ranker-run", default=None, help="ranker run (default: newest; else the stand-in models)")
    parser.add_argument("--quick", action="store_true", help="smoke run: short phases, no training scenarios")
    parser.add_argument("--no-training", action="store_true", help="skip scenario 6")
    parser.add_argument("--render", action="store_true", help="rebuild reliability.md from reliability.json; run nothing")
    args = parser.parse_args()
    if args.render:
        report = json.loads((OUT_DIR / "reliability.json").read_text())
        write_markdown(report, TIMELINE_PNG if (OUT_DIR / TIMELINE_PNG).exists() else None)
        return
    cfg = ChaosConfig(training=not args.no_training)
    if args.quick:
        cfg = ChaosConfig(warm_s=3, after_s=2, overload_s=8, feedback_batches=9, training=False)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    start_machine = machine()
    t_start = time.perf_counter()

    import ray
    from ray import serve

    from serving.app import deploy_declaratively
    from serving.ranking_models import DEFAULT_MODELS_FACTORY
    from training.data.movielens import prepare_ml100k

    dataset = Path(args.dataset)
    if not (dataset / "dataset.json").exists():
        prepare_ml100k(dataset)
    rows: list[dict] = []
    timeline: list = []
    scratch = Path(tempfile.mkdtemp(prefix="rayrec-chaos-"))
    from serving.serve_env import apply_serve_env, shutdown_serve

    apply_serve_env(stats_port=8357, metrics_port=8358)  # as bench_serving.py: Serve as rayrec ships it
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        run_dir = Path(args.run).resolve() if args.run else newest_run(dataset)
        ranker_run = Path(args.ranker_run).resolve() if args.ranker_run else newest_ranker_run(dataset)
        factory = DEFAULT_MODELS_FACTORY if ranker_run is not None else STAND_IN
        users = list(dict.fromkeys(replay_users(dataset, 2000)[0]))  # recently active users, in order
        print(f"run {run_dir.name}, models {factory}", flush=True)

        print("1. replica kills, 2 replicas", flush=True)
        url = deploy_declaratively(run_dir, settings(scratch / "fb1", factory, ranker_run, 2), port=PORT)
        kills = replica_kills(url, users, ["Ingress", "FMWorker", "FMCache", "Predictor"], 2, cfg, rows, timeline)
        shutdown_serve()
        print("2. replica kills, 1 replica", flush=True)
        url = deploy_declaratively(run_dir, settings(scratch / "fb2", factory, ranker_run, 1), port=PORT)
        kills += replica_kills(url, users, ["Ingress"], 1, cfg, rows, timeline)
        shutdown_serve()

        print("3. rollouts", flush=True)
        new_run = successor(run_dir, scratch)  # the same weights under a later version
        rollouts = []
        for replicas in (2, 1):
            rollouts.append(rollout(run_dir, new_run, scratch / f"fb-r{replicas}", factory, ranker_run,
                                    users, replicas, cfg, rows))
            shutdown_serve()

        print("4. overload", flush=True)
        from serving.app import ServingSettings
        from serving.precompute import PrecomputeSettings

        over_settings = ServingSettings(
            feedback_dir=str(scratch / "fb-over"), models_factory=factory,
            ranker_run=str(ranker_run) if ranker_run else None, max_ongoing_requests=8, max_queued_requests=16,
            precompute=PrecomputeSettings(interval_s=0.1, users_per_cycle=16),
        )
        url = deploy_declaratively(run_dir, over_settings, port=PORT)
        over = overload(url, users, cfg, rows)

        print("5. feedback sink killed", flush=True)
        feedback = feedback_kill(url, scratch / "fb-over", cfg, rows)
        shutdown_serve()
    finally:
        shutdown_serve()
        ray.shutdown()

    training = {}
    if cfg.training:
        print("6. training faults", flush=True)
        training = training_faults(rows)
    png = plot(timeline)
    report = {
        "benchmark": "reliability",
        "command": COMMAND + (" --quick" if args.quick else ""),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": start_machine,
        "versions": versions(),
        "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        "models": factory if ranker_run is None else f"{factory} on {ranker_run}",
        "config": cfg.__dict__,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "replica_kills": kills,
        "rollouts": rollouts,
        "overload": over,
        "feedback": feedback,
        "training": training,
        "rows": rows,
    }
    (OUT_DIR / "reliability.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, png)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote docs/benchmarks/reliability.md, reliability.json in {report['wall_s']} s")


if __name__ == "__main__":
    main()
