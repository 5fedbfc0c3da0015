"""Open-loop HTTP traffic for the serving benchmarks (``bench_serving.py``, ``chaos.py``).

Requests go out on a schedule, not when the previous answer arrives, so a slow server cannot
slow the offered load down (a closed loop would hide overload). Traffic comes from the dataset:
``replay_users`` replays the interaction log in time order (users come back in bursts, as they
rated); ``zipf_users`` draws users from a Zipf law over users ranked by activity.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class Shot:
    index: int  # position in the traffic list
    user_id: int
    status: int  # 0: client timeout / connection error
    latency_ms: float
    sent_at: float
    body: dict | None = None
    retry_after: str | None = None  # the Retry-After header, if any


@dataclass
class LoadResult:
    shots: list[Shot] = field(default_factory=list)
    wall_s: float = 0.0

    def ok(self) -> list[Shot]:
        return [s for s in self.shots if 200 <= s.status < 300]

    def pct(self, q: float) -> float | None:
        lat = sorted(s.latency_ms for s in self.ok())
        return float(np.percentile(lat, q)) if lat else None

    def throughput(self) -> float:
        return len(self.ok()) / self.wall_s if self.wall_s else 0.0


# ---------------------------------------------------------------- traffic
def replay_users(dataset: Path, n: int) -> tuple[list[int], list[int]]:
    """(users, items) of the last n interactions of the whole log, in time order."""
    parts = [pq.read_table(dataset / "interactions" / f"{s}.parquet") for s in ("train", "valid", "test")]
    log = pa.concat_tables(parts).sort_by([("timestamp", "ascending"), ("user_id", "ascending")])
    tail = log.slice(max(0, log.num_rows - n))
    return tail.column("user_id").to_pylist(), tail.column("item_id").to_pylist()


def event_gain(ids: list[int], target: int) -> float:
    """NDCG@len(ids) of one replayed event: 1/log2(rank + 2) where its own item ``target`` is
    in the answer ``ids``, else 0 (one relevant item, so the ideal DCG is 1)."""
    return next((1 / math.log2(r + 2) for r, item in enumerate(ids) if item == target), 0.0)


def zipf_users(dataset: Path, n: int, seed: int, alpha: float = 1.1) -> list[int]:
    log = pq.read_table(dataset / "interactions" / "train.parquet", columns=["user_id"])
    counts = log.group_by("user_id").aggregate([("user_id", "count")]).sort_by([("user_id_count", "descending")])
    users = np.asarray(counts.column("user_id").to_pylist())
    weights = 1.0 / np.arange(1, len(users) + 1) ** alpha
    rng = np.random.default_rng(seed)
    return rng.choice(users, size=n, p=weights / weights.sum()).tolist()


async def open_loop(url: str, users: list[int], qps: float, max_s: float, timeout_s: float, k: int = 10) -> LoadResult:
    """Send ``/recommend`` for ``users`` in order at ``qps``, stopping after ``max_s`` seconds."""
    import httpx

    result = LoadResult()
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one(index: int, user: int, sent_at: float) -> None:
            t0 = time.perf_counter()
            try:
                reply = await client.post("/recommend", json={"user_id": user, "k": k, "exclude_seen": False})
                body = reply.json() if reply.status_code == 200 else None
                status, retry_after = reply.status_code, reply.headers.get("retry-after")
            except (httpx.TimeoutException, httpx.TransportError):
                status, body, retry_after = 0, None, None
            result.shots.append(Shot(index, user, status, (time.perf_counter() - t0) * 1e3, sent_at, body, retry_after))

        start = time.perf_counter()
        tasks = []
        for n, user in enumerate(users):
            due = start + n / qps
            if due - start > max_s:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(n, user, due - start)))
        await asyncio.gather(*tasks)
        result.wall_s = time.perf_counter() - start
    return result


def run_load(url: str, users: list[int], qps: float, max_s: float, timeout_s: float) -> LoadResult:
    """:func:`open_loop` from synchronous code."""
    return asyncio.run(open_loop(url, users, qps, max_s, timeout_s))


def cycle(users: list[int], n: int) -> list[int]:
    return [users[i % len(users)] for i in range(n)]
