"""Fault injection against a running rayrec app: steady load, a killed replica, the recovery.

Used by the short fault tests (``tests/reliability``) and by ``make chaos``
(``benchmarks/chaos.py`` → ``docs/benchmarks/reliability.md``), so the two measure the same
thing. Everything is real: the load goes over HTTP through :class:`serving.client.RecommendClient`
(the retrying client users get), and a replica is killed the way a preempted node kills it,
SIGKILL to its worker process, found through Ray's state API.

A fault scenario reads::

    with SteadyLoad(url, users, rate_per_s=40) as load:      # background threads
        time.sleep(2)                                        # baseline
        fault = kill_replica("Retriever")                    # SIGKILL one replica
        recovery_s = wait_replaced(fault)                    # Serve started a new one
        time.sleep(2)                                        # after
    report = load.window(fault.at, fault.at + recovery_s)    # success rate, p99, ...
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from serving.client import RecommendClient, RequestFailed, RetryPolicy

APP_NAME = "rayrec"


@dataclass(frozen=True)
class Shot:
    """One call as the user saw it (after the client's retries).

    Args:
        start: ``time.monotonic()`` when the call began.
        latency_ms: until the final answer, retries and waits included.
        ok: a 2xx answer in the end.
        status: the final HTTP status (None: no response at all).
        attempts: HTTP attempts the call took.
        version: the answer's ``model_version`` (None on failure).
        fm_from_cache: the answer's ``fm_from_cache`` (None without a ranker or on failure).
        error: the server's message or the transport error of a failed call.
        retry_causes: what each retried attempt got (status and message, or the transport error).
    """

    start: float
    latency_ms: float
    ok: bool
    status: int | None
    attempts: int
    version: str | None = None
    fm_from_cache: float | None = None
    error: str | None = None
    retry_causes: tuple[str, ...] = ()


@dataclass
class WindowStats:
    """What a stretch of load looked like to users."""

    calls: int
    success_rate: float
    first_try_rate: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    failed_statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    fm_hit_rate: float | None = None
    versions: dict[str, int] = field(default_factory=dict)
    retry_causes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SteadyLoad:
    """``concurrency`` threads calling ``/recommend`` at ``rate_per_s`` in total, until stopped.

    Closed loop with pacing: each thread waits for its answer, then sleeps to its next slot,
    so a stalled app shows up as latency, never as an unbounded pile of requests. Users are
    drawn round-robin from ``users``.
    """

    def __init__(
        self,
        url: str,
        users: list[int],
        rate_per_s: float = 20.0,
        concurrency: int = 4,
        k: int = 10,
        policy: RetryPolicy | None = None,
    ) -> None:
        self._client = RecommendClient(url, policy or RetryPolicy(max_attempts=6, deadline_s=20.0), seed=0)
        self._users = users
        self._interval = concurrency / rate_per_s
        self._concurrency = concurrency
        self._k = k
        self._shots: list[Shot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> SteadyLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self._concurrency):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"load-{i}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        self._client.close()

    @property
    def shots(self) -> list[Shot]:
        with self._lock:
            return list(self._shots)

    def _loop(self, worker: int) -> None:
        n = worker
        next_at = time.monotonic() + worker * self._interval / self._concurrency
        while not self._stop.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self._interval
            user = self._users[n % len(self._users)]
            n += self._concurrency
            start = time.monotonic()
            try:
                answer = self._client.recommend(user, k=self._k)
                shot = Shot(start, (time.monotonic() - start) * 1e3, True, 200,
                            self._client.last_attempts,
                            answer.get("model_version"), answer.get("fm_from_cache"),
                            retry_causes=self._client.last_retry_causes)
            except RequestFailed as err:
                shot = Shot(start, (time.monotonic() - start) * 1e3, False, err.status, err.attempts, error=err.detail,
                            retry_causes=self._client.last_retry_causes)
            with self._lock:
                self._shots.append(shot)

    def window(self, start: float | None = None, end: float | None = None) -> WindowStats:
        """Stats of the calls that began in ``[start, end)`` (monotonic seconds; None: open)."""
        shots = [
            s for s in self.shots
            if (start is None or s.start >= start) and (end is None or s.start < end)
        ]
        return summarize(shots)


def summarize(shots: list[Shot]) -> WindowStats:
    if not shots:
        return WindowStats(0, 0.0, 0.0, None, None, None)
    latency = np.array([s.latency_ms for s in shots])
    failed: dict[str, int] = {}
    for s in shots:
        if not s.ok:
            key = str(s.status) if s.status is not None else "no response"
            failed[key] = failed.get(key, 0) + 1
    versions: dict[str, int] = {}
    for s in shots:
        if s.version is not None:
            versions[s.version] = versions.get(s.version, 0) + 1
    hits = [s.fm_from_cache for s in shots if s.fm_from_cache is not None]
    causes: dict[str, int] = {}
    for s in shots:
        for cause in s.retry_causes:
            causes[cause] = causes.get(cause, 0) + 1
    return WindowStats(
        calls=len(shots),
        success_rate=sum(s.ok for s in shots) / len(shots),
        first_try_rate=sum(s.ok and s.attempts == 1 for s in shots) / len(shots),
        p50_ms=float(np.percentile(latency, 50)),
        p99_ms=float(np.percentile(latency, 99)),
        max_ms=float(latency.max()),
        failed_statuses=failed,
        errors=sorted({s.error for s in shots if s.error})[:5],
        fm_hit_rate=float(np.mean(hits)) if hits else None,
        versions=versions,
        retry_causes=causes,
    )


@dataclass(frozen=True)
class Fault:
    """A replica killed at ``at`` (monotonic seconds): its deployment, pid and actor ID."""

    deployment: str
    pid: int
    actor_id: str
    at: float
    replicas_before: int


def replica_actors(deployment: str, app: str = APP_NAME) -> list[dict[str, Any]]:
    """Alive replica actors of a deployment: ``[{"actor_id", "pid"}]``.

    Serve names every replica actor ``SERVE_REPLICA::<app>#<deployment>#<suffix>`` in the
    ``serve`` namespace; the pid comes from the actor itself (``__ray_call__``), which needs no
    dashboard (Ray's state API does, and tests run without one).
    """
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [a for a in (_actor_pid(n) for n in _serve_actor_names() if n.startswith(prefix)) if a is not None]


def _serve_actor_names() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]


def _actor_pid(name: str, timeout_s: float = 5.0) -> dict[str, Any] | None:
    """``{"actor_id", "pid"}`` of a named Serve actor, or None when it is dead or unresponsive."""
    import ray

    try:
        actor = ray.get_actor(name, namespace="serve")
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=timeout_s)
    except Exception:  # gone between listing and asking, or still starting
        return None
    return {"actor_id": actor._actor_id.hex(), "pid": int(pid), "name": name}


def kill_replica(deployment: str, app: str = APP_NAME) -> Fault:
    """SIGKILL one replica of ``deployment`` (no draining, no shutdown hook: a lost node)."""
    actors = replica_actors(deployment, app)
    if not actors:
        raise RuntimeError(f"no alive replica of {app}/{deployment}")
    victim = actors[0]
    os.kill(victim["pid"], signal.SIGKILL)
    return Fault(deployment, victim["pid"], victim["actor_id"], time.monotonic(), len(actors))


def wait_replaced(fault: Fault, timeout_s: float = 60.0, app: str = APP_NAME) -> float:
    """Seconds from the kill until the deployment again has as many alive replicas as before,
    none of them the killed one, and Serve reports it HEALTHY."""
    from ray import serve

    deadline = fault.at + timeout_s
    while time.monotonic() < deadline:
        actors = replica_actors(fault.deployment, app)
        alive = [a for a in actors if a["actor_id"] != fault.actor_id]
        status = serve.status().applications.get(app)
        healthy = (
            status is not None
            and fault.deployment in status.deployments
            and status.deployments[fault.deployment].status == "HEALTHY"
        )
        if healthy and len(alive) >= fault.replicas_before and len(alive) == len(actors):
            return time.monotonic() - fault.at
        time.sleep(0.2)
    raise TimeoutError(f"{fault.deployment} not replaced {timeout_s}s after killing pid {fault.pid}")


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes in MiB (Linux ``/proc``; gone processes count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 2**20


def serve_pids(app: str = APP_NAME) -> list[int]:
    """PIDs of the app's replicas and of Serve's proxy and controller (what overload can grow)."""
    names = [
        n for n in _serve_actor_names()
        if n.startswith(f"SERVE_REPLICA::{app}#") or n.startswith("SERVE_PROXY_ACTOR") or n == "SERVE_CONTROLLER_ACTOR"
    ]
    return [a["pid"] for a in (_actor_pid(n) for n in names) if a is not None]


@dataclass
class FaultReport:
    """One killed replica under load, as users saw it.

    Args:
        deployment / replicas: what was killed, and how many replicas it had.
        replaced_s: kill → Serve reports the deployment HEALTHY at full strength again.
        during: calls that began between the kill and the replacement.
        after: calls that began in the ``after_s`` seconds that followed.
        hit_recovered_s: kill → the FM cache hit rate is back at ``hit_threshold`` for good
            (None without a ranker; 0 when it never dropped).
    """

    deployment: str
    replicas: int
    replaced_s: float
    during: WindowStats
    after: WindowStats
    hit_recovered_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "during": self.during.as_dict(), "after": self.after.as_dict()}


def replica_fault(
    load: SteadyLoad,
    deployment: str,
    after_s: float = 3.0,
    timeout_s: float = 90.0,
    hit_threshold: float = 0.8,
    settle_s: float = 0.0,
) -> FaultReport:
    """Kill one replica of ``deployment`` while ``load`` runs; wait for Serve to replace it,
    ``settle_s`` for it to warm (a new FMCache starts empty; the predictor refills it from live
    traffic, which ``hit_recovered_s`` times) and ``after_s`` more; report what the load saw."""
    fault = kill_replica(deployment)
    replaced = wait_replaced(fault, timeout_s)
    time.sleep(settle_s + after_s)
    return FaultReport(
        deployment=deployment,
        replicas=fault.replicas_before,
        replaced_s=replaced,
        during=load.window(fault.at, fault.at + replaced),
        after=load.window(fault.at + replaced + settle_s, fault.at + replaced + settle_s + after_s),
        hit_recovered_s=recovered_s([s for s in load.shots if s.start >= fault.at], fault.at, hit_threshold),
    )


def recovered_s(shots: list[Shot], since: float, threshold: float, bin_s: float = 0.5) -> float | None:
    """Seconds after ``since`` from which every ``bin_s`` bin's mean FM hit share stays at or
    above ``threshold`` (None when no call reported a hit share)."""
    pairs = [(s.start - since, s.fm_from_cache) for s in shots if s.fm_from_cache is not None]
    if not pairs:
        return None
    bins: dict[int, list[float]] = {}
    for t, hit in pairs:
        bins.setdefault(int(t // bin_s), []).append(hit)
    recovered = 0.0
    for b in sorted(bins):
        if float(np.mean(bins[b])) < threshold:
            recovered = (b + 1) * bin_s
    return recovered
