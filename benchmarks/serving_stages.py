"""Where a request's time and the machine's CPU go, per FM mode (a diagnostic, not a benchmark).

Run: ``.venv/bin/python benchmarks/serving_stages.py [--modes off,cache,sync] [--qps 20]
[--seconds 25]``; about 40 s per mode. Deploys the same app as ``bench_serving.py`` (the newest
ml-100k run and ranker run under ``runs/``), replays ml-100k at a fixed rate in each mode and
prints one JSON line per mode:

- ``p50`` / ``p99``: client latency (ms) over real HTTP;
- per server-side stage, ``[p50, p99]`` ms from each answer's ``timings_ms``: ``queue`` (waiting
  for its batch), ``retrieve`` (the batch's retrieval), ``search`` (its torch search), ``rank``
  (the batch's ranking stage), ``fm`` (getting FM features: the cache read), ``score`` (the
  forward pass), ``total`` (inside the Ingress);
- ``cpu_s``: CPU seconds each Serve process (by deployment) and Ray daemon used during the
  window, from ``/proc`` (Linux): what the precompute machinery costs the request path on a
  shared node.

This is how the FM cache hop and the Predictor's per-batch calls were found (stop 14).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_serving import BenchConfig  # noqa: E402  (the serving benchmark's sizes)
from serving_precompute import start_fm_window  # noqa: E402  (its windows)
from serve_app import STAND_IN, AppSpec, deploy, newest_ranker_run, newest_run  # noqa: E402  (the app under test)
from traffic import replay_users, run_load  # noqa: E402

STAGES = ("queue", "retrieve", "search", "rank", "fm", "score", "total")
PROCESS = re.compile(r"ServeReplica:rayrec:(\w+)|(ProxyActor)|(ServeController)|(raylet)|(gcs_server)")


def cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds so far of every Serve replica (by deployment) and Ray daemon."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        match = PROCESS.search(cmdline)
        if match:
            name = next(group for group in match.groups() if group)
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="off,cache,sync", help="FM modes, in order (comma-separated)")
    parser.add_argument("--qps", type=float, default=20.0, help="offered load")
    parser.add_argument("--seconds", type=float, default=25.0, help="measured window per mode")
    args = parser.parse_args()

    import ray
    from ray import serve

    from serving.ranking_models import DEFAULT_MODELS_FACTORY

    dataset = ROOT / "data" / "ml-100k"
    cfg = BenchConfig()
    from serving.serve_env import apply_serve_env

    apply_serve_env(stats_port=8357, metrics_port=8358)  # as bench_serving.py: Serve as rayrec ships it
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        ranker_run = newest_ranker_run(dataset)
        factory = DEFAULT_MODELS_FACTORY if ranker_run is not None else STAND_IN
        feedback = Path(os.environ.get("TMPDIR", "/tmp")) / f"rayrec-stages-feedback-{os.getpid()}"
        app = AppSpec(newest_run(dataset), feedback, factory, ranker_run)
        users, _ = replay_users(dataset, cfg.replay_events)
        url = deploy(app, cfg.candidates, fm_mode="cache")
        n = int(args.qps * args.seconds)
        for mode in args.modes.split(","):
            start_fm_window(url, app, cfg, users, mode)  # cold, as bench_serving
            before = cpu_seconds()
            result = run_load(url, users[:n], args.qps, args.seconds, cfg.timeout_s)
            after = cpu_seconds()
            ok = [s for s in result.ok() if s.body]
            line: dict = {"mode": mode, "answered": len(ok), "p50": result.pct(50), "p99": result.pct(99)}
            for stage in STAGES:
                values = [s.body["timings_ms"][stage] for s in ok if stage in s.body["timings_ms"]]
                if values:
                    line[stage] = [round(float(np.percentile(values, q)), 1) for q in (50, 99)]
            shares = [s.body["fm_from_cache"] for s in ok if s.body.get("fm_from_cache") is not None]
            line["hit_rate"] = float(np.mean(shares)) if shares else None
            line["cpu_s"] = {k: round(v - before.get(k, 0.0), 1) for k, v in after.items() if v - before.get(k, 0.0) >= 0.1}
            print(json.dumps(line), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
