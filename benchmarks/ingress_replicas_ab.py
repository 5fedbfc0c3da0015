"""A/B: goodput of 1 vs 2 Ingress replicas (and the no-Ray FastAPI process) past saturation.

Why: on 2 cores one Ingress replica spends its core on answering the shed requests (HTTP
parsing and the 429 are Python) once the offered rate is well past saturation, so its goodput
falls (``make bench-serve``'s overload phase: 0.48 of saturation at 3x). This measures whether
a second replica (a second Python process for the rejections) keeps more of the capacity.
Levels run in turn, ``--rounds`` times, with the open-loop client of ``benchmarks/traffic.py``.

Run::

    python benchmarks/ingress_replicas_ab.py --variants r1,r2,fa --qps 900 --seconds 15 --rounds 2

``rN``: the app with N Ingress replicas (FM off, shipped settings otherwise); ``fa``: the same
retrieve + rank in one uvicorn process (``benchmarks/fastapi_baseline.py``). Prints one line per
level and a JSON summary; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from saturation import FastAPIBaseline  # noqa: E402
from serve_app import STAND_IN, newest_ranker_run, newest_run  # noqa: E402
from traffic import replay_users, run_load  # noqa: E402

PORT, BASELINE_PORT = 8388, 8389


def deploy(run: Path, factory: str, ranker_run: Path | None, replicas: int, users: list[int]) -> str:
    from serving.app import ServingSettings, deploy_declaratively
    from serving.precompute import PrecomputeSettings
    from serving.ranker import RankerLiveConfig

    settings = ServingSettings(feedback_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "rayrec-ab-feedback"),
                               models_factory=factory, ranker_run=str(ranker_run) if ranker_run else None,
                               num_candidates=50, min_replicas=replicas, max_replicas=replicas,
                               ranker_live=RankerLiveConfig(fm_mode="off"), precompute=PrecomputeSettings(candidates=50))  # fmt: skip
    url = deploy_declaratively(run, settings, port=PORT)
    time.sleep(3)
    run_load(url, users[:200], 40, 5, 10)  # warm connections and replicas, unmeasured
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT / "data" / "ml-100k"))
    parser.add_argument("--variants", default="r1,r2,fa", help="comma-separated: rN (N Ingress replicas) and fa")
    parser.add_argument("--qps", type=float, default=900.0, help="offered rate (open loop)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each level")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from serving.serve_env import apply_serve_env, shutdown_serve

    apply_serve_env(stats_port=8386, metrics_port=8387)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    dataset = Path(args.dataset)
    run, ranker_run = newest_run(dataset), newest_ranker_run(dataset)
    factory = "serving.ranking_models:load_run_models" if ranker_run else STAND_IN
    users = replay_users(dataset, int(args.qps * args.seconds))[0]
    variants = args.variants.split(",")
    baseline = FastAPIBaseline(run, ranker_run, factory, 50, BASELINE_PORT) if "fa" in variants else None
    results: dict[str, list[float]] = {v: [] for v in variants}
    try:
        if baseline is not None:
            baseline.wait_ready()
        for _ in range(args.rounds):
            for variant in variants:
                url = baseline.url if variant == "fa" else deploy(run, factory, ranker_run, int(variant[1:]), users)
                res = run_load(url, users, args.qps, args.seconds, 10)
                shed = sum(s.status in (429, 503) for s in res.shots)
                results[variant].append(round(res.throughput(), 1))
                print(f"{variant}: {res.throughput():.1f} 2xx/s, p50 {res.pct(50)} ms, shed {shed} of {len(res.shots)}, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    finally:
        if baseline is not None:
            baseline.stop()
        shutdown_serve()
        ray.shutdown()
    print(json.dumps({"qps": args.qps, "seconds": args.seconds, "goodput_2xx_per_s": results}))


if __name__ == "__main__":
    main()
