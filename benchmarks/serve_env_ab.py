"""A/B of the Serve runtime settings under overload: Ray's HAProxy defaults vs rayrec's.

Run: ``.venv/bin/python benchmarks/serve_env_ab.py [--rounds 2]`` (about 2.5 minutes per arm and
round on 2 cores). Writes ``docs/benchmarks/serve_env_ab.md`` and ``serve_env_ab.json``.

Why a separate script: HAProxy's settings are read when Ray starts, so each arm is its own local
Ray (a child process of this script), started with ``serving.serve_env`` as shipped and with the
arm's variables on top. Both arms serve the same app as ``make bench-serve`` (the newest ml-100k
run, the heavy stand-in ranker, FM mode ``cache``, shipped ``ServingSettings``) and get the same
open-loop client (``benchmarks/traffic.py``) at the same rates, in alternating order:

- ``level``: ``--level`` req/s for 8 s (a rate both arms keep up with);
- ``overload``: 3x that for 20 s: the 2xx/s achieved is the goodput;
- CPU seconds per second of each process kind over each window (``/proc``), which says who took
  the cores while the Ingress replicas shed.

Arms:
- ``ray_defaults``: HAProxy writes a log datagram per request that the Python HAProxyManager
  parses into Serve's HTTP metrics, with 4 HAProxy threads (Ray 2.60's defaults);
- ``rayrec``: ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0`` (the Ingress replicas record the same
  metrics in process) and ``RAY_SERVE_HAPROXY_NBTHREAD`` = half the cores (``serving.serve_env``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from results import git_commit, machine, mean_se, pm, row  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks"
ARMS = {
    "ray_defaults": {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "4"},
    "metrics_on_1_thread": {"RAY_SERVE_HAPROXY_METRICS_ENABLED": "1"},  # only the thread count changed
    "rayrec": {},  # serving.serve_env as shipped
}


def cpu_by_kind(me: int) -> dict[str, float]:
    """CPU seconds so far of every process on the node, summed by kind (HAProxy, this client,
    the Ingress replicas, each other Ray actor class, raylet/GCS, the rest)."""
    out: dict[str, float] = {}
    hz = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / hz
        if int(pid) == me:
            kind = "client"
        elif cmd.startswith("haproxy") or "/haproxy " in cmd:
            kind = "haproxy"
        elif "Ingress" in cmd:
            kind = "ingress"
        elif cmd.startswith("ray::"):
            kind = cmd.split()[0].split(".")[0].removeprefix("ray::ServeReplica:rayrec:").removeprefix("ray::")
        elif "raylet" in cmd or "gcs_server" in cmd:
            kind = "raylet/gcs"
        else:
            kind = "other"
        out[kind] = out.get(kind, 0.0) + seconds
    return out


def arm(level: float, overload_s: float) -> dict:
    """One arm in this process (the parent set its environment): deploy, warm, measure."""
    import ray
    from ray import serve

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from serve_app import STAND_IN, AppSpec, deploy, newest_run
    from traffic import cycle, replay_users, run_load

    from serving.serve_env import apply_serve_env

    apply_serve_env(stats_port=8357, metrics_port=8358)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    dataset = ROOT / "data" / "ml-100k"
    feedback = Path(os.environ.get("TMPDIR", "/tmp")) / f"rayrec-ab-feedback-{os.getpid()}"
    url = deploy(AppSpec(newest_run(dataset), feedback, STAND_IN, None), 50, fm_mode="cache")
    users, _ = replay_users(dataset, 300)
    run_load(url, users[:20], 5, 5, 10.0)
    windows = {}
    try:
        for name, qps, seconds in (("level", level, 8.0), ("overload", 3 * level, overload_s)):
            before, t0 = cpu_by_kind(os.getpid()), time.perf_counter()
            res = run_load(url, cycle(users, int(qps * seconds)), qps, seconds, 10.0)
            after, wall = cpu_by_kind(os.getpid()), time.perf_counter() - t0
            statuses = [s.status for s in res.shots]
            ok = sum(200 <= s < 300 for s in statuses)
            windows[name] = {
                "offered_qps": qps, "goodput_qps": ok / res.wall_s, "share_2xx": ok / len(statuses),
                "non_2xx": sorted(set(statuses) - {200}), "p99_ms_2xx": res.pct(99),
                "cpu_cores": {k: round((after[k] - before.get(k, 0.0)) / wall, 3) for k in after
                              if after[k] - before.get(k, 0.0) > 0.005 * wall},
            }  # fmt: skip
            time.sleep(3)
    finally:
        serve.shutdown()
        ray.shutdown()
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (each runs every arm once)")
    parser.add_argument("--level", type=float, default=480.0, help="req/s both arms keep up with; overload is 3x")
    parser.add_argument("--overload-s", type=float, default=20.0)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # the child process's own arm
    args = parser.parse_args()
    if args.arm:
        print("ARM " + json.dumps(arm(args.level, args.overload_s)), flush=True)
        return
    start, rows, results = machine(), [], {name: [] for name in ARMS}
    for r in range(args.rounds):
        for name in list(ARMS)[r % len(ARMS):] + list(ARMS)[: r % len(ARMS)]:
            env = os.environ | ARMS[name] | {"PYTHONPATH": str(ROOT)}
            out = subprocess.run([sys.executable, __file__, "--arm", name, "--level", str(args.level),
                                  "--overload-s", str(args.overload_s)], env=env, capture_output=True, text=True)  # fmt: skip
            line = next((x for x in out.stdout.splitlines() if x.startswith("ARM ")), None)
            if line is None:
                raise SystemExit(f"arm {name} failed:\n{out.stderr[-3000:]}")
            windows = json.loads(line[4:])
            results[name].append(windows)
            print(f"round {r} {name}: goodput {windows['overload']['goodput_qps']:.1f} req/s at 3x, "
                  f"{windows['level']['goodput_qps']:.1f} at the level", flush=True)  # fmt: skip
            for w, v in windows.items():
                rows.append(row(name, "ml-100k", "goodput_qps", v["goodput_qps"], window=w, offered_qps=v["offered_qps"], round=r))
    summary = {}
    for name, runs in results.items():
        share = [w["overload"]["goodput_qps"] / w["level"]["goodput_qps"] for w in runs]
        summary[name] = {"overload_goodput_qps": mean_se([w["overload"]["goodput_qps"] for w in runs]),
                         "overload_over_level": mean_se(share)}  # fmt: skip
        rows.append(row(name, "ml-100k", "overload_goodput_over_level", summary[name]["overload_over_level"][0],
                        se=summary[name]["overload_over_level"][1], rounds=args.rounds))  # fmt: skip
    command = "python benchmarks/serve_env_ab.py " + " ".join(sys.argv[1:])
    report = {"benchmark": "serve_env_ab", "command": command, "git_commit": git_commit(),
              "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": start,
              "arms": ARMS, "results": results, "summary": summary, "rows": rows}  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve_env_ab.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# Serve runtime settings under overload: Ray's HAProxy defaults vs rayrec's", "",
        f"Command: `{command}`. Date {report['date']}, commit {report['git_commit']}, machine {start['cpu']} "
        f"({start['cores']} cores, load average {start['load_average_at_start']} at start). The arms alternate; "
        f"each starts its own local Ray (`serving/serve_env.py` plus the arm's variables) and serves the bench-serve "
        f"app, then takes {args.level:.0f} req/s for 8 s and {3 * args.level:.0f} req/s for {args.overload_s:.0f} s "
        "from the same open-loop client on the same 2 cores.", "",
        "| arm | settings | 2xx/s at 3x | 3x goodput ÷ level goodput |", "|---|---|---|---|",
    ]  # fmt: skip
    for name, s in summary.items():
        settings = ", ".join(f"{k}={v}" for k, v in ARMS[name].items()) or "serving.serve_env as shipped"
        lines.append(f"| {name} | {settings} | {pm(s['overload_goodput_qps'], 1)} | {pm(s['overload_over_level'])} |")
    lines += ["", "CPU cores used per process kind in the 3x window (mean over rounds):", "",
              "| arm | " + " | ".join(k for k in ("ingress", "client", "haproxy", "HAProxyManager", "FMCache", "ServeController")) + " |",
              "|---|" + "---|" * 6]  # fmt: skip
    for name, runs in results.items():
        cells = [f"{sum(w['overload']['cpu_cores'].get(k, 0.0) for w in runs) / len(runs):.2f}"
                 for k in ("ingress", "client", "haproxy", "HAProxyManager", "FMCache", "ServeController")]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Machine-readable rows: `serve_env_ab.json`.", ""]
    (OUT / "serve_env_ab.md").write_text("\n".join(lines))
    print("wrote docs/benchmarks/serve_env_ab.md, serve_env_ab.json")


if __name__ == "__main__":
    main()
