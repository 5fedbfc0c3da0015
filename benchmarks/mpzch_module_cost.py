"""Per-call cost of the training-path MPZCH module against table size (issue #26).

Why: an MPZCH module call must cost O(batch), not O(table). This times ``MPZCHModule``'s
forward (TorchRec's input mapper, eviction scoring, rayrec's CPU insert kernel and the table
counters) on the same stream of batches at several table sizes, and, inside the same calls, the
insert kernel alone; ``overhead`` is the difference. Compare commits by running it on each:

    PYTHONPATH=. .venv/bin/python benchmarks/mpzch_module_cost.py
    PYTHONPATH=. .venv/bin/python benchmarks/mpzch_module_cost.py --threads 1 2 --rounds 5

Every table size sees the same batches: ``--batch`` IDs drawn with replacement from a pool of
``--pool`` random 63-bit IDs (so each call mixes inserts and hits in the same proportion at
every size). Each (rows, threads) cell is timed ``--rounds`` times on a fresh table, with the
cells of one round interleaved, because the machine may be shared: the figures are the median
over rounds of each round's median per call.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import embeddings.mpzch as mpzch  # noqa: E402
from embeddings.tables import TableSpec, build_mpzch_module  # noqa: E402
from torchrec.sparse.jagged_tensor import JaggedTensor  # noqa: E402


class KernelTimer:
    """Wraps the insert kernel that ``embeddings.mpzch`` calls and sums its wall time."""

    def __init__(self, kernel: Callable) -> None:
        self.kernel = kernel
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.kernel(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out


def batches(pool: int, batch: int, calls: int, seed: int) -> list[torch.Tensor]:
    """``calls`` batches of ``batch`` raw ids ``[batch]`` drawn from ``pool`` random ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 2**63 - 1, (pool,), generator=generator)
    return [ids[torch.randint(0, pool, (batch,), generator=generator)] for _ in range(calls)]


def time_cell(rows: int, eviction: str, stream: list[torch.Tensor], warmup: int, timer: KernelTimer) -> tuple[float, float]:
    """Median (module ms, kernel ms) per call over ``stream`` after ``warmup`` calls, on a fresh table."""
    spec = TableSpec(name="item", features=["item_id"], cardinality=rows // 2, dim=8, rows=rows,
                     buckets=8, eviction=eviction, ttl_hours=24)
    module = build_mpzch_module(spec, torch.device("cpu"))
    module_ms, kernel_ms = [], []
    for i, ids in enumerate(stream):
        features = {"item_id": JaggedTensor(values=ids, lengths=torch.ones_like(ids, dtype=torch.int32))}
        timer.seconds = 0.0
        start = time.perf_counter()
        module(features)
        module.evict()  # what the collection does after every remap
        elapsed = time.perf_counter() - start
        if i >= warmup:
            module_ms.append(elapsed * 1e3)
            kernel_ms.append(timer.seconds * 1e3)
    return statistics.median(module_ms), statistics.median(kernel_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000],
                        help="table sizes (rows, one rank, 8 buckets)")
    parser.add_argument("--batch", type=int, default=4096, help="ids per call")
    parser.add_argument("--pool", type=int, default=25_000, help="distinct ids the batches draw from")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per cell")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch.set_num_threads values")
    parser.add_argument("--eviction", choices=["none", "ttl", "lru"], default="ttl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.getLogger("torchrec").setLevel(logging.ERROR)  # one INFO/WARNING block per table

    timer = KernelTimer(mpzch.zero_collision_hash_insert)
    mpzch.zero_collision_hash_insert = timer  # the name embeddings/mpzch.py calls
    stream = batches(args.pool, args.batch, args.warmup + args.calls, args.seed)
    cells = [(rows, threads) for rows in args.rows for threads in args.threads]
    results: dict[tuple[int, int], list[tuple[float, float]]] = {cell: [] for cell in cells}
    for _ in range(args.rounds):
        for rows, threads in cells:
            torch.set_num_threads(threads)
            results[(rows, threads)].append(time_cell(rows, args.eviction, stream, args.warmup, timer))

    print(f"batch {args.batch}, pool {args.pool}, eviction {args.eviction}, {args.calls} calls x "
          f"{args.rounds} interleaved rounds; median of round medians, ms per call")
    print(f"{'rows':>11} {'threads':>7} {'module':>8} {'kernel':>8} {'overhead':>8}")
    for rows, threads in cells:
        module_ms = statistics.median(m for m, _ in results[(rows, threads)])
        kernel_ms = statistics.median(k for _, k in results[(rows, threads)])
        print(f"{rows:>11,} {threads:>7} {module_ms:>8.3f} {kernel_ms:>8.3f} {module_ms - kernel_ms:>8.3f}")


if __name__ == "__main__":
    main()
