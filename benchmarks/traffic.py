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
    """Send ``/recommend`` for ``users`` in order at ``qps``, stopping after ``max_s`` seconds.

    The client is ``lean_http.LeanClient`` (its docstring says why not aiohttp or httpx: the load
    generator shares the 2 cores with the servers it measures, so its CPU per request must be
    small next to theirs, most of all at 3x saturation).
    """
    from lean_http import LeanClient

    result = LoadResult()
    async with LeanClient(url, limit=512) as client:

        async def one(index: int, user: int, sent_at: float) -> None:
            t0 = time.perf_counter()
            try:
                status, body, retry_after = await client.post_json("/recommend", {"user_id": user, "k": k, "exclude_seen": False}, timeout_s)
            except (asyncio.TimeoutError, OSError):
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


class Poster:
    """Sequential JSON posts over one kept-alive connection (``http.client``, the standard
    library): the sequential-latency phases time the server, so the client must cost little
    (httpx's sync client added milliseconds of CPU to each request here).

    Example::

        with Poster("http://127.0.0.1:8000") as post:
            status, body = post("/recommend", {"user_id": 1, "k": 10})
    """

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self._host, self._port, self._timeout = parts.hostname or "127.0.0.1", parts.port or 80, timeout_s
        self._conn = None

    def __enter__(self) -> "Poster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __call__(self, path: str, payload: dict) -> tuple[int, dict | None]:
        """POST ``payload`` as JSON; (status, parsed body or None). A dropped keep-alive
        connection is reopened once; other connection errors raise ``OSError``."""
        import http.client
        import json

        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            try:
                self._conn.request("POST", path, body=data, headers=headers)
                reply = self._conn.getresponse()
                raw = reply.read()
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt:
                    raise
                continue
            body = json.loads(raw) if reply.status == 200 and raw else None
            return reply.status, body
        raise AssertionError("unreachable")


def expect_200(reply: tuple[int, dict | None]) -> dict | None:
    """A :class:`Poster` reply's body; raises unless the status is 200."""
    status, body = reply
    if status != 200:
        raise RuntimeError(f"expected 200, got {status}")
    return body


def run_load(url: str, users: list[int], qps: float, max_s: float, timeout_s: float) -> LoadResult:
    """:func:`open_loop` from synchronous code."""
    return asyncio.run(open_loop(url, users, qps, max_s, timeout_s))


def cycle(users: list[int], n: int) -> list[int]:
    return [users[i % len(users)] for i in range(n)]
