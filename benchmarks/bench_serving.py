"""Serving benchmark: saturation vs a no-Ray baseline, latency, SOLARIS precompute, overload, autoscaling.

Run: ``.venv/bin/python benchmarks/bench_serving.py`` (``make bench-serve``); about 15-20 minutes
on 2 shared cores. Writes ``docs/benchmarks/serving.md``, ``serving.json`` (format:
``/work/shared/specs/benchmark-results.md``) and ``serving_*.png``.

Everything goes over real loopback HTTP to a local Serve app, driven by an open-loop async
client (``benchmarks/lean_http.py`` via ``benchmarks/traffic.py``: requests are sent on a schedule, not when the previous answer
arrives, so a slow server cannot slow the offered load down). The app serves the newest
ml-100k run under ``runs/`` (trained with ``configs/tiny.yaml`` first if there is none) with a
ranker stage, deployed with the shipped ``ServingSettings`` defaults (nothing overridden but
where feedback goes and which run serves) on a local Ray started with ``serving.serve_env``
(HAProxy ingress, throughput-optimized Serve), as ``rayrec serve`` starts one. Until a trained ranker artifact exists (``runs/<id>/ranker/``) the ranker and FM
are the stand-ins of ``tests/serving/stand_in_models.py`` with an FM made ~25 MLP layers deep,
so the FM costs what precompute is meant to hide; quality figures (NDCG) are then about the
stand-in, and reported only as a sanity check.

Traffic:
- ``replay``: ml-100k interactions (train+valid+test) in timestamp order, the last N events;
  each event is a ``/recommend`` for its user (users come back in bursts, as they rated).
- ``zipf``: users drawn from a Zipf(1.1) law over users ranked by activity.

Phases (durations scaled down from the issue's 60 s to keep the run under ~15 minutes, plus ~4 min
the first time, when phase 6 trains its synthetic runs):
1. saturation, bisected (``benchmarks/saturation.py``) for the app and for ``fastapi_inprocess``
   (the same retrieve + rank in one plain uvicorn process, ``benchmarks/fastapi_baseline.py``),
   level by level in turn, with the same open-loop client; then sequential latency of the two
   and of the same work in this process (``inprocess``), in interleaved blocks.
2. Serve overhead: the same retrieval+ranking called in-process vs through Serve, sequentially, FM off.
3. precompute on / off / synchronous FM: the replay at a fixed rate per mode (mode switched
   live through the Ranker's ``user_config``), in interleaved windows pooled per mode: hit
   rate, speculation precision, staleness, p99, NDCG@10 of the event's item.
4. overload: 3x saturation for ``overload_s``: goodput (2xx/s ÷ saturation), shed (429/503 with
   Retry-After), other 5xx, recovery, Serve's resident memory before, after and once recovered.
5. autoscaling: a step load (low → high → low) with replicas sampled every second (PNG).
6. SOLARIS quality on synthetic data: phase 3's modes on an app serving a two-tower + ranker
   trained on ``data/synth-ranker``, each answer's NDCG@10 scored against the generator's true
   preference (``benchmarks/synth_quality.py`` says why ml-100k cannot show the FM's gain).
7. (part ``solaris``) precompute, the reactive cache and no FM in the same interleaved windows of
   session traffic: hit rate split into first requests and repeats, p99 ratio with its interval
   (``benchmarks/solaris_windows.py``).

Parts (``--parts main solaris``, both by default): phases 1-6 are ``main``, phase 7 is
``solaris``; a part run alone replaces only its own rows in serving.json (and its section of
serving.md), keeping the others with the commit and date they were measured at (``runs``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import git_commit, machine, row  # noqa: E402
from serving_report import PARTS, merge_parts, plots, write_markdown  # noqa: E402  (benchmarks/serving_report.py)
import solaris_windows  # noqa: E402  (benchmarks/solaris_windows.py: part `solaris`)
from solaris_windows import SolarisConfig  # noqa: E402
from traffic import Poster, cycle, event_gain, expect_200, replay_users, run_load, zipf_users  # noqa: E402  (benchmarks/traffic.py)
from saturation import Bisection, FastAPIBaseline, median, sequential_p50, serve_rss_mib, sweep  # noqa: E402
from inprocess import fm_quality_paired, load_inprocess, overhead  # noqa: E402  (benchmarks/inprocess.py)
import synth_quality  # noqa: E402  (benchmarks/synth_quality.py)
from serving_precompute import precompute_modes, solaris_summary, synth_phase  # noqa: E402  (phases 3 and 6)
from serve_app import (  # noqa: E402  (benchmarks/serve_app.py: the app under test)
    STAND_IN, AppSpec, deploy, newest_ranker_run, newest_run, replicas, versions, wait_steady,
)

OUT_DIR = ROOT / "docs" / "benchmarks"
COMMAND = "make bench-serve  (.venv/bin/python benchmarks/bench_serving.py)"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of every phase.

    Args:
        replay_events: last N events of the time-ordered log replayed.
        start_qps: the saturation sweep's first level (it doubles, then bisects to ±
            ``tolerance``); level_s: seconds per level (max).
        mode_qps_share: the precompute comparison runs at this share of saturation; mode_s: seconds
            per window; mode_rounds: interleaved windows per mode, pooled; synth_mode_rounds /
            synth_mode_s: the same on the synthetic app (phase 6), which measures quality, not tail
            latency, so one longer window per mode: more of the replay's users (50 s: ~17);
            synth_population: synthetic users whose paired FM gain phase 6 measures.
        overload_factor / overload_s: the burst, as a multiple of saturation, and its length.
        step: (low qps, high qps, low s, high s, low-after s) of the autoscaling step load;
            step_over_saturation: the high step is at least this multiple of saturation.
        timeout_s: client timeout (a request past it counts as a timeout, not a 2xx).
    """

    replay_events: int = 900
    start_qps: float = 20.0
    tolerance: float = 0.1
    level_s: float = 8.0
    mode_qps_share: float = 0.5
    mode_s: float = 25.0
    mode_rounds: int = 4
    synth_mode_rounds: int = 1
    synth_mode_s: float = 50.0
    synth_population: int = 600
    overload_factor: float = 3.0
    overload_s: float = 60.0
    step: tuple[float, float, float, float, float] = (3.0, 40.0, 8.0, 30.0, 20.0)
    step_over_saturation: float = 1.25
    timeout_s: float = 10.0
    settle_s: float = 15.0
    candidates: int = 50
    seed: int = 0
    baseline_port: int = 8356


# ---------------------------------------------------------------- phases
def saturation(url: str, app: AppSpec, users: list[int], cfg: BenchConfig, rows: list, dataset: str) -> dict:
    """Phase 1: the app and ``fastapi_inprocess`` bisected in turn, then sequential latency of
    both and of ``inprocess`` (the same retrieve + rank in this process, FM off)."""
    factory = app.factory
    baseline = FastAPIBaseline(app.run_dir, app.ranker_run, factory, cfg.candidates, cfg.baseline_port)
    try:
        baseline.wait_ready()
        run_load(baseline.url, users[:20], 5, 3, cfg.timeout_s)  # warm-up
        systems = {"serve": Bisection(url, cfg.start_qps, cfg.tolerance),
                   "fastapi_inprocess": Bisection(baseline.url, cfg.start_qps, cfg.tolerance)}
        sweep(systems, users, cfg.level_s, cfg.timeout_s)
        index, stage = load_inprocess(app.run_dir, factory, app.ranker_run)
        from serving.ranker import RankQuery
        from serving.retriever import Query

        def inprocess(i: int) -> None:
            answer = index.search([Query(users[i], cfg.candidates, exclude_seen=False)])[0]
            stage.rank([RankQuery(users[i], answer.item_ids, 10)], None, None)

        with Poster(url) as serve_post, Poster(baseline.url) as fa_post:
            body = lambda i: {"user_id": users[i], "k": 10, "exclude_seen": False}  # noqa: E731
            seq = sequential_p50({
                "inprocess": inprocess,
                "serve": lambda i: expect_200(serve_post("/recommend", body(i))),
                "fastapi_inprocess": lambda i: expect_200(fa_post("/recommend", body(i))),
            })  # fmt: skip
    finally:
        baseline.stop()
    out = {"systems": {}, "sequential": {}}
    for name, b in systems.items():
        rows.append(row(name, dataset, "saturation_qps", b.saturation, traffic="replay", fm_mode="cache" if name == "serve" else "none",
                        kept_up_qps=b.lo, failed_qps=b.hi, tolerance=cfg.tolerance, level_s=cfg.level_s))  # fmt: skip
        for lv in b.levels:
            for metric, value in (("throughput_qps", lv.achieved_qps), ("p50_ms", lv.p50_ms), ("p95_ms", lv.p95_ms), ("p99_ms", lv.p99_ms)):
                rows.append(row(name, dataset, metric, value, offered_qps=lv.offered_qps, traffic="replay", kept_up=lv.kept_up))
        out["systems"][name] = {"saturation_qps": b.saturation, "kept_up_qps": b.lo, "failed_qps": b.hi,
                                "levels": [lv.__dict__ for lv in b.levels]}  # fmt: skip
        print(f"  {name}: saturation {b.saturation:.1f} req/s (kept up at {b.lo}, not at {b.hi})", flush=True)
    for name, lat in seq.items():
        p50 = median(lat)
        rows.append(row(name, dataset, "sequential_p50_ms", p50, requests=len(lat), fm_mode="cache" if name == "serve" else "off"))
        out["sequential"][name] = {"p50_ms": p50, "p99_ms": float(np.percentile(lat, 99)), "requests": len(lat)}
        print(f"  sequential {name}: p50 {p50:.2f} ms", flush=True)
    return out


def overload(url: str, users: list[int], sat: float, cfg: BenchConfig, rows: list, dataset: str) -> dict:
    """3x saturation for ``overload_s``: goodput, shedding, 5xx, recovery and memory."""
    qps = cfg.overload_factor * max(sat, 1.0)
    rss_before = serve_rss_mib()
    res = run_load(url, cycle(users, int(qps * cfg.overload_s)), qps, cfg.overload_s, cfg.timeout_s)
    rss_after = serve_rss_mib()
    statuses = [s.status for s in res.shots]
    total = len(statuses)
    ok = sum(200 <= s < 300 for s in statuses)
    shed = sum(s in (429, 503) for s in statuses)
    shed_without_retry_after = sum(s.status in (429, 503) and not s.retry_after for s in res.shots)
    five = sum(500 <= s < 600 and s != 503 for s in statuses)
    timeouts = sum(s in (0, 408) for s in statuses)
    goodput = ok / res.wall_s if res.wall_s else 0.0
    # recovery: probe at a low rate until five answers in a row are 200 within 1 s
    t0 = time.perf_counter()
    streak, recovery = 0, None
    with Poster(url, timeout_s=cfg.timeout_s) as post:
        while time.perf_counter() - t0 < 60:
            s0 = time.perf_counter()
            try:
                good = post("/recommend", {"user_id": users[0], "k": 10})[0] == 200
            except OSError:
                good = False
            streak = streak + 1 if good and time.perf_counter() - s0 < 1.0 else 0
            if streak == 5:
                recovery = time.perf_counter() - t0
                break
            time.sleep(0.2)
    time.sleep(5)
    rss_recovered = serve_rss_mib()
    stats = {"offered_qps": qps, "requests": total, "share_2xx": ok / total, "share_shed": shed / total,
             "goodput_qps": goodput, "goodput_share_of_saturation": goodput / sat if sat else None,
             "responses_5xx": five, "shed_without_retry_after": shed_without_retry_after, "timeouts": timeouts,
             "recovery_s": recovery, "p99_ms_2xx": res.pct(99), "sent_qps": total / cfg.overload_s,
             "serve_rss_mib": {"before": rss_before, "after": rss_after, "recovered": rss_recovered}}  # fmt: skip
    print(f"  overload {qps:.0f} qps for {cfg.overload_s:.0f}s: {stats}", flush=True)
    rows += [
        row("serve", dataset, "overload_goodput_share", stats["goodput_share_of_saturation"], offered_qps=qps, seconds=cfg.overload_s,
            goodput_qps=goodput, saturation_qps=sat),
        row("serve", dataset, "share_2xx", ok / total, offered_qps=qps, seconds=cfg.overload_s),
        row("serve", dataset, "responses_shed", shed, offered_qps=qps, seconds=cfg.overload_s, of=total,
            without_retry_after=shed_without_retry_after),
        row("serve", dataset, "responses_5xx", five, offered_qps=qps, seconds=cfg.overload_s, of=total),
        row("serve", dataset, "timeouts", timeouts, offered_qps=qps, seconds=cfg.overload_s, of=total),
        row("serve", dataset, "recovery_s", recovery, offered_qps=qps),
        *[row("serve", dataset, "serve_rss_mib", v, when=k, offered_qps=qps) for k, v in stats["serve_rss_mib"].items()],
    ]  # fmt: skip
    return stats


def step_load(url: str, app: AppSpec, users: list[int], cfg: BenchConfig, rows: list, dataset: str, sat: float) -> tuple[list[dict], float]:
    """Replicas over a low → high → low load; the high step is at least ``step_over_saturation``
    × saturation, so it needs more replicas than the shipped ones whatever the machine's capacity.
    The one phase not on the shipped defaults: they hold the Ingress at 2 replicas on 2 cores
    (``ServingSettings.max_replicas``), so this phase allows 3 to show the autoscaler at work."""
    low, high, s_low, s_high, s_after = cfg.step
    high = round(max(high, cfg.step_over_saturation * sat), 1)
    time.sleep(cfg.settle_s)  # let the previous phase's replicas scale back down first
    deploy(app, cfg.candidates, fm_mode="cache", max_replicas=3)
    wait_steady()
    samples: list[dict] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    offered = {"qps": low}

    def sample() -> None:
        while not stop.is_set():
            samples.append({"t": time.perf_counter() - t0, "offered_qps": offered["qps"], **replicas()})
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    phases = [(low, s_low), (high, s_high), (low, s_after)]
    results = []
    for qps, seconds in phases:
        offered["qps"] = qps
        results.append(run_load(url, cycle(users, int(qps * seconds)), qps, seconds, cfg.timeout_s))
    time.sleep(2)
    stop.set()
    sampler.join()
    peak = {name: max(s.get(name, 0) for s in samples) for name in ("Ingress",)}
    print(f"  step load {low}->{high}->{low} qps: peak replicas {peak}", flush=True)
    for name, n in peak.items():
        rows.append(row("serve", dataset, "peak_replicas", n, deployment=name, step_qps=[low, high, low]))
    rows.append(row("serve", dataset, "p99_ms", results[1].pct(99), phase="step_high", offered_qps=high))
    deploy(app, cfg.candidates, fm_mode="cache")  # back to the shipped defaults
    return samples, high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT / "data" / "ml-100k"))
    parser.add_argument("--run", default=None, help="run folder (default: newest ml-100k run under runs/)")
    parser.add_argument("--ranker-run", default=None,
                        help="ranker run folder (with ranker/); default: newest ml-100k ranker run under runs/, "
                             "else the stand-in models")
    parser.add_argument("--quick", action="store_true", help="a smoke run: every phase a few seconds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="main: phases 1-6; solaris: precompute vs the reactive cache (benchmarks/solaris_windows.py). "
                             "A part run alone replaces only its own rows and section")
    parser.add_argument("--solaris-app", choices=("synth", "ml-100k"), default="synth",
                        help="the app part solaris serves: synth (trained ranker + FM, quality against the true "
                             "preference) or the ml-100k app of phases 1-5")
    parser.add_argument("--solaris-rounds", type=int, default=SolarisConfig.rounds, help="interleaved rounds of part solaris")
    args = parser.parse_args()
    cfg = BenchConfig()
    scfg = SolarisConfig(rounds=args.solaris_rounds)
    if args.quick:
        cfg = BenchConfig(replay_events=300, start_qps=40, tolerance=0.3, level_s=3, mode_s=6, mode_rounds=1, synth_mode_s=6,
                          overload_s=6, step=(2, 20, 3, 6, 4), settle_s=2)  # fmt: skip
        scfg = SolarisConfig(rounds=2, window_s=6)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    start_load = machine()
    t_start = time.perf_counter()

    import ray

    from serving.serve_env import apply_serve_env
    from training.data.movielens import prepare_ml100k

    dataset = Path(args.dataset)
    if not (dataset / "dataset.json").exists():
        prepare_ml100k(dataset)
    # as `rayrec serve` starts a local Ray (HAProxy ingress, throughput-optimized Serve), with
    # HAProxy's stats/metrics listeners in serving's port range (8340-8359)
    apply_serve_env(stats_port=8357, metrics_port=8358)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    rows: list[dict] = []
    fresh: dict = {}
    try:
        run_dir = Path(args.run).resolve() if args.run else newest_run(dataset)
        if "main" in args.parts:
            synth_runs = synth_quality.prepare(ROOT, newest_run, newest_ranker_run)  # before Serve holds CPUs
        from serving.ranking_models import DEFAULT_MODELS_FACTORY

        ranker_run = Path(args.ranker_run).resolve() if args.ranker_run else newest_ranker_run(dataset)
        factory = DEFAULT_MODELS_FACTORY if ranker_run is not None else STAND_IN
        feedback_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"rayrec-bench-feedback-{os.getpid()}"
        app = AppSpec(run_dir, feedback_dir, factory, ranker_run)
        users, items = replay_users(dataset, cfg.replay_events)
        name = "ml-100k"
        if "main" in args.parts:
            print(f"run {run_dir.name}, models {factory}; deploying", flush=True)
            url = deploy(app, cfg.candidates, fm_mode="cache")
            run_load(url, users[:20], 5, 5, cfg.timeout_s)  # warm-up
            fresh = main_part(url, app, users, items, synth_runs, feedback_dir, cfg, rows, name, dataset)
        if "solaris" in args.parts:
            print(f"7. SOLARIS: precompute, reactive cache and no FM in the same interleaved windows ({args.solaris_app} app)",
                  flush=True)  # fmt: skip
            fresh["solaris_windows"] = solaris_windows.part(app, dataset, feedback_dir, args.solaris_app, scfg, rows) | {
                "git_commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "load_average_at_start": start_load["load_average_at_start"], "args": " ".join(sys.argv[1:])}  # fmt: skip
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    report = {
        "benchmark": "serving",
        "command": COMMAND,
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": start_load,
        "versions": versions(),
        "run": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir),
        "models": factory if ranker_run is None else f"{factory} on {ranker_run}",
        "stand_in": factory == STAND_IN,
        "config": {k: v for k, v in cfg.__dict__.items()},
        "wall_s": round(time.perf_counter() - t_start, 1),
        **{k: v for k, v in fresh.items() if k != "samples"},
        "rows": rows,
    }
    path = OUT_DIR / "serving.json"
    report = merge_parts(json.loads(path.read_text()) if path.is_file() else None, report, args.parts)
    path.write_text(json.dumps(report, indent=1) + "\n")
    md_path = OUT_DIR / "serving.md"
    if "main" in args.parts:
        pngs = plots(report["throughput"], fresh["samples"], OUT_DIR)
        write_markdown(report, report["precompute"], report["overload"], pngs, OUT_DIR)
    if "solaris_windows" in report:
        md = md_path.read_text() if md_path.is_file() else "# Serving benchmark\n"
        md_path.write_text(solaris_windows.splice(md, solaris_windows.markdown(report["solaris_windows"])))
    print(f"wrote docs/benchmarks/serving.md, serving.json in {time.perf_counter() - t_start:.0f} s")


def main_part(url: str, app: AppSpec, users: list[int], items: list[int], synth_runs: tuple[Path, Path, Path],
              feedback_dir: Path, cfg: BenchConfig, rows: list, name: str, dataset: Path) -> dict:  # fmt: skip
    """Phases 1-6 (the module docstring); returns the report's sections."""
    run_dir, factory, ranker_run = app.run_dir, app.factory, app.ranker_run
    zipf = zipf_users(dataset, cfg.replay_events, cfg.seed)
    print("1. saturation, bisected: the app and fastapi_inprocess in turn (replay); sequential latency", flush=True)
    throughput = saturation(url, app, users, cfg, rows, name)
    sat = throughput["systems"]["serve"]["saturation_qps"]
    zres = run_load(url, zipf, max(1.0, 0.5 * sat), cfg.level_s, cfg.timeout_s)
    rows += [row("serve", name, f"p{q}_ms", zres.pct(q), traffic="zipf", offered_qps=round(0.5 * sat, 1)) for q in (50, 95, 99)]
    print(f"  zipf at {0.5 * sat:.1f} qps: p50 {zres.pct(50)} p99 {zres.pct(99)}", flush=True)

    print("2. Serve overhead", flush=True)
    deploy(app, cfg.candidates, fm_mode="off")
    index, stage = load_inprocess(run_dir, factory, ranker_run)  # the models the app serves, in this process
    overhead(url, index, stage, users, rows, name)

    print("3. precompute on / off / sync FM", flush=True)
    mode_qps = max(1.0, cfg.mode_qps_share * sat)

    def event_quality(i: int, _user: int, ids: list[int]) -> float:
        return event_gain(ids, items[i])

    modes, event_hits = precompute_modes(url, app, users, event_quality, mode_qps, cfg, rows, name)

    print("   the FM's NDCG gain on the same events, paired in-process", flush=True)
    paired = fm_quality_paired(index, stage, users, event_quality, event_hits, min(len(users), int(mode_qps * cfg.mode_s)), rows, name,
                               cfg.candidates)  # fmt: skip

    print("4. overload", flush=True)
    over = overload(url, users, sat, cfg, rows, name)

    print("5. step load / autoscaling", flush=True)
    samples, step_high = step_load(url, app, users, cfg, rows, name, sat)

    print("6. SOLARIS quality on synthetic data (true preference known)", flush=True)
    synth = synth_phase(url, synth_runs, users, feedback_dir, cfg, mode_qps, rows)
    deploy(app, cfg.candidates, fm_mode="cache")  # the ml-100k app again, for a following part
    return {
        "throughput": throughput,
        "step_high_qps": step_high,
        "solaris": solaris_summary(modes, rows, name),
        "peak_replicas": {r["params"]["deployment"]: r["value"] for r in rows if r["metric"] == "peak_replicas"},
        "precompute": modes,
        "fm_quality_paired": paired,
        "synth": synth,
        "overload": over,
        "samples": samples,
    }


if __name__ == "__main__":
    main()
