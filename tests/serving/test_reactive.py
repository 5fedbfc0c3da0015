"""The reactive cache fill (serving/reactive.py) against a fake FM worker pool: no Ray."""

from __future__ import annotations

import asyncio

import numpy as np

from serving.reactive import MissFiller


class FakeWorkers:
    """Stands in for the FMWorker handle: ``embed.remote(users, items)`` waits for ``release``."""

    def __init__(self) -> None:
        self.calls: list[list[tuple[int, int]]] = []
        self.release = asyncio.Event()
        self.embed = self  # handle.embed.remote(...)

    def remote(self, users: np.ndarray, items: np.ndarray):
        self.calls.append(list(zip(users.tolist(), items.tolist())))
        return self._done(len(users))

    async def _done(self, n: int) -> int:
        await self.release.wait()
        return n


def ids(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def test_missed_pairs_are_sent_once_while_in_flight_in_bounded_batches() -> None:
    async def scenario() -> None:
        workers = FakeWorkers()
        filler = MissFiller(workers, batch_pairs=2, max_inflight_pairs=4)
        assert filler.fill(ids(7, 7, 7), ids(1, 2, 3)) == 3
        await asyncio.sleep(0)
        assert workers.calls == [[(7, 1), (7, 2)], [(7, 3)]]  # batches of batch_pairs
        assert filler.fill(ids(7, 7), ids(1, 2)) == 0  # already in flight: not asked twice
        assert filler.fill(ids(8, 8, 8), ids(1, 2, 3)) == 1  # room for one more pair
        assert filler.stats["dropped_pairs"] == 2 and filler.inflight == 4
        workers.release.set()
        await asyncio.sleep(0.01)
        assert filler.inflight == 0
        assert filler.fill(ids(7), ids(1)) == 1  # settled: a later miss asks again

    asyncio.run(scenario())
