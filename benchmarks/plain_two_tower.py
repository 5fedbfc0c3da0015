"""The two-tower training loop of ``training/jobs/train_retrieval.py`` under plain ``torchrun``,
no Ray: the baseline ``make bench-training`` measures Ray Train's overhead against.

Same model and sharding (``build_trainable``: MPZCH tables row-wise over gloo, fused row-wise
Adagrad), same step (``train_step``), same examples in the same seeded order
(``retrieval_data``), each rank taking an equal contiguous share in batches of
``train.batch_size``, as Ray Data's equal split does; no evaluation, checkpoint or export, only
the epochs' training loops, timed like the Ray Train worker times its own (``examples_per_s``,
``time_s/<phase>``).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/plain_two_tower.py \\
        --config configs/ml100k.yaml --data data/ml-100k --epochs 2 --out /tmp/plain.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.data.loader import to_kjt  # noqa: E402
from training.data.retrieval_data import retrieval_data  # noqa: E402
from training.jobs.step_timing import StepTimes  # noqa: E402
from training.jobs.train_retrieval import build_trainable, train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="local dataset folder")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", required=True, help="rank 0 writes its per-epoch figures here (JSON)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(args.config, [f"data.path={args.data}", f"scaling.num_workers={world}"])
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    examples, shared = retrieval_data(Path(args.data), cfg.data.history_len, cfg.eval.max_users, cfg.seed)
    share = examples.num_rows // world
    mine = examples.slice(rank * share, share)
    model, optimizer = build_trainable(cfg, torch.device("cpu"))
    log_q = shared["log_q"] if cfg.model.logq_correction else None
    size = cfg.train.batch_size
    epochs = []
    for epoch in range(args.epochs):
        model.train()
        times, steps, examples_seen = StepTimes(), 0, 0
        dist.barrier()
        t0 = time.perf_counter()
        for start in range(0, mine.num_rows - size + 1, size):  # drop_last, like the Ray worker
            with times("data"):
                kjt = to_kjt(mine.slice(start, size))
            train_step(model, optimizer, kjt, log_q, cfg.model.temperature, times)
            steps += 1
            examples_seen += size
        train_s = time.perf_counter() - t0
        epochs.append({"epoch": epoch, "steps": steps, "train_s": train_s,
                       "examples_per_s": examples_seen * world / train_s, **times.as_metrics()})
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": world, "epochs": epochs}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
