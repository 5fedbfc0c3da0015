"""Train a two-tower retriever over sharded MPZCH tables with Ray Train: the recipe.

Driver (``run``): validate config → create the run folder → read Parquet and cut examples →
Ray Data dataset → ``TorchTrainer`` over N workers → result.

Each worker (``train_loop_per_worker``), top to bottom:

1. device and seed
2. model: MPZCH tables on "meta" + tower MLPs → DMP (tables row-wise across workers)
3. optimizer: fused row-wise Adagrad in the tables' backward, AdamW for the towers
4. restore the latest checkpoint, if any (resume after a failure or a re-run)
5. per epoch: train on this worker's Ray Data shard (Arrow → KJT), evaluate (full ranking,
   leave-one-out, seen items masked), save a sharded DCP checkpoint and report; with
   ``train.patience``, stop once valid Recall@10 has not improved for that many epochs
6. at the end: the best epoch's weights back (with patience), test metrics (``eval.json``)
   and the serving index (``index/``)

Every collective step (DMP forward, report) runs the same number of times on every rank.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any, Optional

import pyarrow.parquet as pq
import torch

from embeddings.tables import identities_digest, mpzch_metrics, set_mpzch_training
from training.checkpoint import checkpoint_to_resume, load_checkpoint, report_checkpoint, save_checkpoint
from training.config import RetrievalRunConfig
from training.data.eval_sets import EvalUsers
from training.data.loader import LogQ, to_kjt
from training.early_stop import BestEpoch
from training.eval.distributed import evaluate
from training.export import export_index, own_row_items
from training.jobs.launch import run_retrieval_job, start_worker, worker_run
from training.jobs.step_timing import StepTimes
from training.progress import StepProgress
from training.runs import RunDir

logger = logging.getLogger("rayrec.train")

CONFIG = RetrievalRunConfig


# ---------------------------------------------------------------- the per-worker recipe
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    cfg = RetrievalRunConfig.model_validate(config["cfg"])
    run, data_dir = worker_run(config)
    # 1. rank, device, seeds and threads
    worker = start_worker(cfg)
    rank, world, device = worker.rank, worker.world, worker.device

    # 2-3. model (tables sharded row-wise across the workers) and optimizer
    model, optimizer = build_trainable(cfg, device)
    log_q: Optional[LogQ] = config["log_q"] if cfg.model.logq_correction else None

    # 4. restore: the interrupted epoch restarts from its beginning, in the same example order;
    #    only a registered, committed checkpoint loads, and rank 0 removes what an interrupted save left
    start_epoch = 0
    checkpoint = checkpoint_to_resume(run, rank)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(model, optimizer, directory)
        start_epoch = state["epoch"] + 1
        restored = identities_digest(model)
        if restored != state["identities"]:  # never train on from a table that differs from the saved one
            raise RuntimeError(f"MPZCH identities after restore {restored} differ from the checkpoint's {state['identities']}")
        if rank == 0:
            logger.info("resumed from %s at epoch %d (world size %d)", checkpoint.path, start_epoch, world)
            run.append_metrics({"event": "resumed", "epoch": start_epoch, "checkpoint": checkpoint.path,
                                "world_size": world, "identities_match": True})

    items = pq.read_table(data_dir / "items.parquet", columns=["item_id"])
    valid_users: EvalUsers = config["valid_users"]
    shard = ray.train.get_dataset_shard("train")
    steps_cap = cfg.train.max_steps_per_epoch
    # what the driver draws its progress bars from
    progress = StepProgress(run, rank, world, cfg.train.log_every, config.get("steps_per_epoch"), logger=logger)
    every_position = every_position_training(cfg)
    best = BestEpoch(cfg.train.patience)
    served_epoch = cfg.train.epochs - 1

    # 5. epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        set_mpzch_training(model, True)
        progress.start_epoch(epoch)
        t0, steps, examples, loss_sum, seen_digest = time.perf_counter(), 0, 0, 0.0, 0
        times = StepTimes()
        batches = iter(shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", drop_last=True))
        while steps_cap is None or steps < steps_cap:  # every rank stops at the same step: shards are equal
            with times("data"):
                batch = next(batches, None)
                kjt = to_kjt(batch).to(device) if batch is not None else None
            if kjt is None:
                break
            item_ids = kjt["item_id"].values()
            # which examples this epoch consumed (order-free): a resumed epoch must match
            users = torch.repeat_interleave(kjt["user_id"].values(), kjt["item_id"].lengths().long())  # one per target
            seen_digest += int(((users * 1_000_003 + item_ids) % 2_147_483_647).sum())
            loss = train_step(model, optimizer, kjt, log_q, cfg.model.temperature, times, every_position=every_position)
            steps += 1
            examples += item_ids.numel()  # targets: one per row, or one per history item (every_position)
            loss_sum += float(loss.detach())
            run.write_heartbeat(rank, epoch=epoch, step=steps, phase="train")
            progress.step(steps, examples, loss_sum / steps)
        train_s = time.perf_counter() - t0
        run.write_heartbeat(rank, epoch=epoch, step=steps, phase="eval")

        model.eval()
        set_mpzch_training(model, False)
        metrics = {f"valid/{k}": v for k, v in evaluate(model, own_row_items(model, items), valid_users, cfg.eval.ks, 512).items()}
        metrics.update(
            epoch=epoch,
            steps=steps,
            loss=loss_sum / max(steps, 1),
            examples_per_s=examples * world / max(train_s, 1e-9),
            train_s=train_s,
            **times.as_metrics(),
        )
        metrics.update(mpzch_metrics(model))
        digest = torch.tensor([seen_digest], dtype=torch.int64)
        dist.all_reduce(digest)
        metrics["examples_digest"] = int(digest.item())
        identities = identities_digest(model)
        if rank == 0:
            run.append_metrics(metrics)
            logger.info(
                "epoch %d done: loss %.4f valid recall@10 %.4f ndcg@10 %.4f (%.1fs)",
                epoch, metrics["loss"], metrics["valid/recall@10"], metrics["valid/ndcg@10"], train_s,
            )
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            save_checkpoint(model, optimizer, {"epoch": epoch, "identities": identities}, tmp)
            report_checkpoint(metrics, tmp, epoch)  # two-phase: rank 0's train_state.json commits it
        served_epoch = epoch
        if best.update(epoch, metrics):  # identical metrics on every rank: every rank decides alike
            best.keep(model)
        if best.should_stop:
            break

    # 5b. with patience: serve the best epoch's weights, not the last's
    restored = best.restore(model)
    if restored is not None:
        served_epoch = restored
        if rank == 0:
            run.append_metrics({"event": "best_epoch", "epoch": restored, "valid/recall@10": best.best_value,
                                "stopped_after_epoch": epoch, "patience": cfg.train.patience})
            logger.info("serving epoch %d (valid recall@10 %.4f); stopped after epoch %d", restored, best.best_value, epoch)

    # 6. test metrics and the serving index
    model.eval()
    set_mpzch_training(model, False)
    test_users: EvalUsers = config["test_users"]
    progress.stage("test metrics", 1, 2)
    test = {f"test/{k}": v for k, v in evaluate(model, own_row_items(model, items), test_users, cfg.eval.ks, 512).items()}
    progress.stage("serving index", 2, 2)
    export_index(model, run, config["data_dir"], pq.read_table(data_dir / "items.parquet"), config["train_valid"], cfg, f"{run.run_id}/epoch-{served_epoch:04d}")
    if rank == 0:
        run.write_json(run.eval_path, test)
        run.push()  # a run in object storage: publish index/ and eval.json
        logger.info("test: %s", {k: round(v, 4) for k, v in test.items() if "@10" in k})


# ---------------------------------------------------------------- the pieces the loop shares
def build_trainable(cfg: RetrievalRunConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The two-tower with its MPZCH tables sharded row-wise across the process group (DMP) and
    the optimizer (fused row-wise Adagrad in the tables' backward, AdamW for the towers).
    Shared by the Ray Train worker and the plain ``torchrun`` baseline of ``make bench-training``."""
    from embeddings.sharding import combined_optimizer, shard_model
    from training.models.two_tower import build_two_tower, table_specs

    model = build_two_tower(cfg.model, device=torch.device("meta"))  # "meta": DMP allocates only this rank's rows
    model = shard_model(model, table_specs(cfg.model), device, cfg.train.embedding_optimizer, cfg.train.embedding_lr)
    return model, combined_optimizer(model, cfg.train.lr, cfg.train.weight_decay)


def every_position_training(cfg: RetrievalRunConfig) -> bool:
    """Whether the run trains every slot of the sequential tower (``model.sequence.train_positions: all``)."""
    return cfg.model.user_tower == "sequential" and cfg.model.sequence.train_positions == "all"


def train_step(model: torch.nn.Module, optimizer: Any, kjt: Any, log_q: Optional[LogQ], temperature: float,
               times: StepTimes, weight: Optional[torch.Tensor] = None, every_position: bool = False) -> torch.Tensor:
    """One step on a batch (KJT of user_id, item_id, history); returns the loss. The forward
    includes the sharded lookup (input dist, MPZCH remap, embedding bag, output dist).
    ``weight`` [B] marks padding rows with 0 (see ``in_batch_softmax_loss``).

    ``every_position``: ``item_id`` holds one target per history item; the user vector after
    each item is scored against every target in the batch, the same in-batch softmax (log-q,
    repeats of the positive masked) over H rows instead of B, so every real slot counts once."""
    from training.models.two_tower import in_batch_softmax_loss

    item_ids = kjt["item_id"].values()
    with times("forward"):
        user, item = model(kjt, every_position=True) if every_position else model(kjt)
        loss = in_batch_softmax_loss(user, item, item_ids, log_q(item_ids) if log_q is not None else None, temperature, weight)
    with times("backward"):
        optimizer.zero_grad()
        loss.backward()
    with times("optimizer"):
        optimizer.step()
    return loss


# ---------------------------------------------------------------- driver
def run(cfg: RetrievalRunConfig, run_id: Optional[str] = None, config_stem: str = "run") -> RunDir:
    """Train ``cfg`` on a Ray cluster (``ray.init()`` is called when none is connected).

    Re-running with the same ``run_id`` resumes from that run's latest checkpoint.
    """
    from training.models.two_tower import table_specs

    window = cfg.model.sequence.max_len if every_position_training(cfg) else None
    return run_retrieval_job(cfg, train_loop_per_worker, table_specs(cfg.model), run_id, config_stem, window=window)
