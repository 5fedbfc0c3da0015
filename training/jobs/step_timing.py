"""Where a training step's time goes: data, forward (lookup included), backward, optimizer.

Why a plain accumulator and not the torch profiler: these numbers are reported every epoch in
``metrics.jsonl`` and compared between Ray Train and plain ``torchrun`` runs of the same loop
(``make bench-training``), so they must cost nothing measurable (two ``perf_counter`` calls per
phase) and mean the same in both.

Example::

    times = StepTimes()
    with times("data"):
        kjt = to_kjt(batch)
    times.as_metrics()  # {"time_s/data": 0.42, ...}
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

PHASES = ("data", "forward", "backward", "optimizer")


class StepTimes:
    """Seconds spent per phase since construction (or :meth:`reset`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()

    def as_metrics(self, prefix: str = "time_s/") -> dict[str, float]:
        return {f"{prefix}{phase}": self.seconds.get(phase, 0.0) for phase in PHASES}
