"""Saturation by bisection, the no-Ray baseline beside it, sequential latency and Serve's memory:
the serving benchmark's throughput measurements (``bench_serving.py`` phases 1 and 4).

A system *keeps up* with an offered load (open loop, ``traffic.run_load``) when at least
``KEEP_UP_SHARE`` of the requests sent are answered 2xx and their p99 stays under
``KEEP_UP_P99_MS`` (a queue that grows for the whole level fails the second). The sweep doubles
the offered load from a start until a level fails, then bisects between the last level kept up
with and the first that was not until they are within ±``tolerance`` of their midpoint;
saturation is the achieved rate at the highest level kept up with. Several systems are swept
level by level in turn (interleaved), so a change in the machine's load hits all of them.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from traffic import LoadResult, cycle, run_load

KEEP_UP_SHARE = 0.95
KEEP_UP_P99_MS = 1000.0


@dataclass
class Level:
    offered_qps: float
    achieved_qps: float
    share_2xx: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    non_2xx: int
    kept_up: bool


@dataclass
class Bisection:
    """One system's sweep: double from ``start_qps`` until a level fails, then bisect."""

    url: str
    start_qps: float
    tolerance: float = 0.1
    levels: list[Level] = field(default_factory=list)
    lo: float = 0.0  # highest offered load kept up with
    hi: float | None = None  # lowest offered load not kept up with

    def next_qps(self) -> float | None:
        if self.hi is None:
            return self.start_qps if not self.levels else 2 * self.lo
        if self.lo == 0.0:  # even the start failed: halve down
            return self.hi / 2 if self.hi / 2 >= 1 else None
        if self.hi <= self.lo * (1 + self.tolerance) / (1 - self.tolerance):  # within ±tolerance of the midpoint
            return None
        return round((self.lo + self.hi) / 2, 1)

    def record(self, level: Level) -> None:
        self.levels.append(level)
        if level.kept_up:
            self.lo = max(self.lo, level.offered_qps)
        else:
            self.hi = level.offered_qps if self.hi is None else min(self.hi, level.offered_qps)

    @property
    def saturation(self) -> float:
        """Achieved 2xx/s at the highest level kept up with (0 if none was)."""
        kept = [lv for lv in self.levels if lv.kept_up and lv.offered_qps == self.lo]
        return kept[-1].achieved_qps if kept else 0.0


def measure_level(url: str, users: list[int], qps: float, seconds: float, timeout_s: float) -> Level:
    res: LoadResult = run_load(url, cycle(users, int(qps * seconds)), qps, seconds, timeout_s)
    sent = len(res.shots)
    ok = len(res.ok())
    p99 = res.pct(99)
    kept = sent > 0 and ok / sent >= KEEP_UP_SHARE and p99 is not None and p99 <= KEEP_UP_P99_MS
    return Level(qps, res.throughput(), ok / sent if sent else 0.0, res.pct(50), res.pct(95), p99, sent - ok, kept)


def sweep(systems: dict[str, Bisection], users: list[int], seconds: float, timeout_s: float, pause_s: float = 1.0) -> None:
    """Bisect every system, one level of each in turn, until all have converged."""
    while True:
        pending = {name: b.next_qps() for name, b in systems.items()}
        pending = {name: qps for name, qps in pending.items() if qps is not None}
        if not pending:
            return
        for name, qps in pending.items():
            level = measure_level(systems[name].url, users, qps, seconds, timeout_s)
            systems[name].record(level)
            print(f"  {name:18s} offered {qps:6.1f}: {level.achieved_qps:6.1f} ok/s  share {level.share_2xx:.3f}  "
                  f"p50 {level.p50_ms}  p99 {level.p99_ms}  {'kept up' if level.kept_up else 'NOT kept up'}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            time.sleep(pause_s)  # let the previous level's stragglers drain


def sequential_p50(calls: dict[str, object], rounds: int = 3, per_round: int = 50) -> dict[str, list[float]]:
    """Latencies (ms) of sequential calls, ``rounds`` interleaved blocks of ``per_round`` per system.
    ``calls``: name → ``fn(i)`` making call i."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, call in calls.items():
            for i in range(r * per_round, (r + 1) * per_round):
                t0 = time.perf_counter()
                call(i)  # type: ignore[operator]
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class FastAPIBaseline:
    """``benchmarks/fastapi_baseline.py`` in a subprocess: the same retrieve + rank, one plain
    uvicorn process, no Ray (system ``fastapi_inprocess``)."""

    def __init__(self, run_dir: Path, ranker_run: Path | None, factory: str, candidates: int, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        root = Path(__file__).resolve().parents[1]
        command = [sys.executable, str(root / "benchmarks" / "fastapi_baseline.py"), "--run", str(run_dir),
                   "--factory", factory, "--num-candidates", str(candidates), "--port", str(port)]  # fmt: skip
        if ranker_run is not None:
            command += ["--ranker-run", str(ranker_run)]
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastapi_baseline.py exited with {self.process.returncode}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError("fastapi_baseline.py did not start")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def serve_rss_mib() -> float:
    """Resident memory of this machine's Serve processes (replicas, controller, proxies, HAProxy), MiB."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            if not any(key in cmd for key in ("ServeReplica", "ServeController", "ProxyActor", "haproxy")):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024
