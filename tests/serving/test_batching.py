"""QueueBatcher: a batch is what queued while the previous batch ran (no Ray)."""

from __future__ import annotations

import asyncio

import pytest

from serving.batching import QueueBatcher


def test_a_lone_request_runs_at_once_and_requests_that_queue_meanwhile_share_the_next_batch() -> None:
    batches: list[list[int]] = []

    async def double(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.05)  # the batch's work; requests arriving now wait for the next one
        return [2 * i for i in items]

    async def scenario() -> list[int]:
        batcher = QueueBatcher(double, max_batch_size=3)
        first = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)  # the first batch is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(scenario()) == [0, 2, 4, 6, 8, 10]
    assert batches == [[0], [1, 2, 3], [4, 5]]  # at most max_batch_size, in arrival order


def test_a_failing_batch_fails_its_requests_only() -> None:
    async def fn(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad batch")
        return items

    async def scenario() -> tuple[object, int]:
        batcher = QueueBatcher(fn, max_batch_size=1)
        bad, good = await asyncio.gather(batcher.submit(13), batcher.submit(7), return_exceptions=True)
        return bad, good

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, ValueError) and good == 7


def test_cancelled_requests_are_dropped_before_their_batch_runs() -> None:
    seen: list[list[int]] = []

    async def fn(items: list[int]) -> list[int]:
        seen.append(items)
        await asyncio.sleep(0.05)
        return items

    async def scenario() -> int:
        batcher = QueueBatcher(fn, max_batch_size=8)
        running = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(2))
        kept = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while it waited
        await running
        return await kept

    assert asyncio.run(scenario()) == 3
    assert seen == [[1], [3]]


def test_a_fill_wait_gathers_a_batch() -> None:
    seen: list[list[int]] = []

    async def fn(items: list[int]) -> list[int]:
        seen.append(items)
        return items

    async def scenario() -> None:
        batcher = QueueBatcher(fn, max_batch_size=8, wait_s=0.05)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, batcher.submit(2))

    asyncio.run(scenario())
    assert seen == [[1, 2]]


@pytest.mark.parametrize("size", [1, 16])
def test_wrong_result_count_is_an_error(size: int) -> None:
    async def fn(items: list[int]) -> list[int]:
        return items + [0]

    async def scenario() -> None:
        await QueueBatcher(fn, max_batch_size=size).submit(1)

    with pytest.raises(RuntimeError, match="results"):
        asyncio.run(scenario())
