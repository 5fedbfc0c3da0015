"""Session traffic for the SOLARIS windows (``benchmarks/solaris_windows.py``): users who open the
app, then ask for recommendations a few times, sent open loop over real HTTP.

A *session* is one user's visit: a ``session_start`` ``/feedback`` event (the app opening,
``serving.feedback_log.SESSION_START_EVENT``) and ``lead_s`` later the first ``/recommend``, then
more requests separated by think times. Sessions start as a Poisson process; each user has at
most one session per plan, so a request's place in its session (first or repeat) is known to
the client, and the hit rate splits into first requests and repeats with no per-request
remote call and nothing added to the answer.

Every mode of a round is sent the same plan (the same users at the same offsets, session-start
events included), so the modes differ only in what the server does with it.

Example::

    plan = session_plan(users, seconds=20, sessions_per_s=10, mean_requests=4, think_s=1.5, lead_s=1.0, seed=0)
    result = run_plan("http://127.0.0.1:8350", plan, timeout_s=10)   # one Visit per request
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Request:
    """One planned ``/recommend``: when (seconds from the plan's start), for whom, and its place."""

    at_s: float
    user_id: int
    session: int
    first: bool


@dataclass(frozen=True)
class SessionPlan:
    """The session starts ``[(at_s, user)]`` and the requests, both in time order."""

    starts: list[tuple[float, int]]
    requests: list[Request]


@dataclass
class Visit:
    """A sent request's outcome: status (0: timeout or connection error), latency, and the share of
    its candidates whose FM came from the cache (None: not read from the cache)."""

    request: Request
    status: int
    latency_ms: float
    fm_from_cache: float | None


@dataclass
class PlanResult:
    visits: list[Visit] = field(default_factory=list)
    starts_ok: int = 0
    wall_s: float = 0.0

    def ok(self) -> list[Visit]:
        return [v for v in self.visits if v.status == 200]

    def p(self, q: float) -> float | None:
        lat = [v.latency_ms for v in self.ok()]
        return float(np.percentile(lat, q)) if lat else None

    def hit_rate(self, first: bool | None = None) -> float | None:
        """Mean ``fm_from_cache`` over answered requests: all (None), first of session or repeats."""
        shares = [v.fm_from_cache for v in self.ok() if v.fm_from_cache is not None and first in (None, v.request.first)]
        return float(np.mean(shares)) if shares else None


def session_plan(users: list[int], seconds: float, sessions_per_s: float, mean_requests: float, think_s: float,
                 lead_s: float, seed: int) -> SessionPlan:  # fmt: skip
    """Sessions starting at rate ``sessions_per_s`` over ``seconds``, each by a distinct user drawn
    from ``users``, with 1 + Poisson(``mean_requests`` - 1) requests, the first ``lead_s`` after the
    session start and the next ones exponential(``think_s``) apart; requests past ``seconds`` are
    dropped (the window ends).

    Raises:
        ValueError: when there are more sessions than users.
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / sessions_per_s, int(3 * seconds * sessions_per_s) + 10)
    opens = np.cumsum(gaps)
    opens = opens[opens < seconds - lead_s]
    if len(opens) > len(users):
        raise ValueError(f"{len(opens)} sessions, only {len(users)} users")
    who = rng.choice(np.asarray(users), len(opens), replace=False).tolist()
    requests = []
    for session, (start, user) in enumerate(zip(opens.tolist(), who)):
        n = 1 + int(rng.poisson(mean_requests - 1))
        at = start + lead_s + np.concatenate([[0.0], np.cumsum(rng.exponential(think_s, n - 1))])
        requests += [Request(float(t), int(user), session, k == 0) for k, t in enumerate(at.tolist()) if t < seconds]
    return SessionPlan(list(zip(opens.tolist(), [int(u) for u in who])), sorted(requests, key=lambda r: r.at_s))


async def _send(url: str, plan: SessionPlan, timeout_s: float, k: int) -> PlanResult:
    from lean_http import LeanClient  # the load generator's client (benchmarks/lean_http.py says why)

    result = PlanResult()
    async with LeanClient(url, limit=512) as client:

        async def start(n: int, user: int) -> None:
            event = {"event_id": f"start-{time.time_ns()}-{n}", "user_id": user, "item_id": 0,
                     "event": "session_start", "timestamp": int(time.time())}  # fmt: skip
            try:
                status, _, _ = await client.post_json("/feedback", {"events": [event]}, timeout_s)
                result.starts_ok += status == 200
            except (asyncio.TimeoutError, OSError):
                pass

        async def recommend(request: Request) -> None:
            t0 = time.perf_counter()
            status, share = 0, None
            try:
                status, body, _ = await client.post_json("/recommend", {"user_id": request.user_id, "k": k}, timeout_s)
                share = body.get("fm_from_cache") if body is not None else None
            except (asyncio.TimeoutError, OSError):
                status = 0
            result.visits.append(Visit(request, status, (time.perf_counter() - t0) * 1e3, share))

        events = sorted([(at, 0, n, user) for n, (at, user) in enumerate(plan.starts)]
                        + [(r.at_s, 1, n, r) for n, r in enumerate(plan.requests)], key=lambda e: (e[0], e[1]))  # fmt: skip
        begin = time.perf_counter()
        tasks = []
        for at, kind, n, what in events:
            await asyncio.sleep(max(0.0, begin + at - time.perf_counter()))
            tasks.append(asyncio.create_task(start(n, what) if kind == 0 else recommend(what)))
        await asyncio.gather(*tasks)
        result.wall_s = time.perf_counter() - begin
    return result


def run_plan(url: str, plan: SessionPlan, timeout_s: float, k: int = 10) -> PlanResult:
    """Send ``plan`` open loop (each event at its offset, whatever the answers) to the app at ``url``."""
    return asyncio.run(_send(url, plan, timeout_s, k))
