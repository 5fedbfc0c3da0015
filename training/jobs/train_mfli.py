"""Train MFLI (item facets co-trained with their RQ codebooks) with Ray Train: the recipe.

The driver and the data path are the two-tower job's (``training/jobs/train_retrieval.py``):
the same examples, log-q, eval users and run folder. What differs is per worker:

1. device and seed
2. model: MPZCH tables (ids + genre/year/title) on "meta" + towers + one RQ per facet → DMP
   (tables row-wise; towers DDP; codebooks are buffers kept identical by all-reduced EMA)
3. optimizer: fused row-wise Adagrad for the tables, AdamW for the towers
4. restore the latest checkpoint, if any; a continued job (``rayrec train --continue``,
   ``training.jobs.continue_retrieval``) starts from its parent's instead, trains the new
   feedback positives (zero-weight padding rows train nothing) and commits the watermark with
   the checkpoint (``training.jobs.feedback_epochs``)
5. per epoch: train (retrieval + RQ losses; codebook re-seeding/splitting every
   ``model.rebalance_every`` steps on the gathered batch), evaluate exact search, then embed
   the catalogue, rebalance the codes on it, code every item, build the index, evaluate the
   MFLI lookup, log the occupancy histogram, save model + tables + index and report
6. at the end: test metrics of both (``eval.json``), the two-tower-compatible serving files
   (``index/``, concatenated facets) and the MFLI index (``index/mfli/``)

Every collective (DMP forward, EMA all-reduce, rebalance, report) runs the same number of
times on every rank.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from embeddings.tables import identities_digest, mpzch_metrics, set_mpzch_training
from training.checkpoint import checkpoint_to_resume, load_checkpoint, report_checkpoint, save_checkpoint
from training.config import ContinualConfig, RetrievalRunBase, two_tower_only
from training.data.eval_sets import EvalUsers
from training.data.loader import LogQ, to_kjt
from training.eval.distributed import embed_rows, evaluate, evaluate_retriever
from training.export import export_index
from training.index.content_encoder import ENCODER_DIR, export_content_encoder
from training.index.mfli_index import MFLIIndex
from training.jobs.feedback_epochs import FeedbackEpochs, batch_weight
from training.jobs.launch import run_retrieval_job, start_worker, worker_run
from training.progress import StepProgress
from training.models.mfli import FACETS, MFLIModelConfig, facet_slices
from training.models.rq import occupancy_metrics
from training.runs import RunDir

logger = logging.getLogger("rayrec.train")

INDEX_IN_CHECKPOINT = "mfli_index"
"""Sub-folder of each checkpoint holding that epoch's index (written by rank 0)."""


class MFLIRunConfig(RetrievalRunBase):
    """``kind: mfli``: MFLI over MPZCH tables (training/jobs/train_mfli.py)."""

    kind: Literal["mfli"] = "mfli"
    model: MFLIModelConfig = Field(default_factory=MFLIModelConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)

    _two_tower_only = model_validator(mode="after")(two_tower_only)


CONFIG = MFLIRunConfig


# ---------------------------------------------------------------- index and its evaluation
@torch.no_grad()
def build_index(core, item_ids: torch.Tensor, item_emb: torch.Tensor, cfg: MFLIModelConfig) -> tuple[MFLIIndex, dict[str, torch.Tensor]]:
    """Code every item with its facets' quantizers and index them (same on every rank).

    Returns the index and each facet's codes ``[N, L]``.
    """
    codebooks, codes, embeddings = {}, {}, {}
    for name, cols in facet_slices(cfg.dim).items():
        rq = core.quantizers[name]
        codebooks[name] = rq.codebooks.clone()
        embeddings[name] = item_emb[:, cols]
        codes[name] = rq.encode(embeddings[name])
    index = MFLIIndex(codebooks, beam=cfg.beam, depth=cfg.depth)
    index.add_items(item_ids, embeddings, codes=codes)
    return index, codes


def evaluate_index(model, index: MFLIIndex, users: EvalUsers, ks: list[int]) -> dict[str, float]:
    """Leave-one-out metrics of the MFLI lookup (collective: users split over ranks)."""
    user_emb = embed_rows(model, users.histories, ["user_id", "history"], 512, tower="user")
    return evaluate_retriever(index, user_emb, users, ks)


def codebook_drift(core) -> float:
    """Largest difference of any codebook entry between ranks (0.0: identical everywhere)."""
    import torch.distributed as dist

    flat = torch.cat([core.quantizers[name].codebooks.flatten() for name in FACETS])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


# ---------------------------------------------------------------- the per-worker recipe
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from embeddings.sharding import combined_optimizer, shard_model
    from training.models.item_content import ItemContent
    from training.models.mfli import build_mfli, mfli_loss, table_specs

    cfg = MFLIRunConfig.model_validate(config["cfg"])
    run, data_dir = worker_run(config)
    # 1. rank, device, seeds and threads
    worker = start_worker(cfg)
    rank, world, device = worker.rank, worker.world, worker.device

    # 2. model: tables on "meta" so DMP allocates only this rank's rows
    model = build_mfli(cfg.model, device=torch.device("meta"))
    model = shard_model(model, table_specs(cfg.model), device, cfg.train.embedding_optimizer, cfg.train.embedding_lr)
    core = model.module  # the unwrapped MFLI: quantizers and content live here
    # the catalogue with its content: the dataset's, or a continued job's (plus the live items)
    items = config["items"] if "items" in config else pq.read_table(data_dir / "items.parquet")
    core.set_content(ItemContent.from_items(items))
    # 3. optimizer
    optimizer = combined_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    log_q: LogQ | None = config["log_q"] if cfg.model.logq_correction else None

    # 4. restore (a registered, committed checkpoint only; rank 0 removes what an interrupted save left)
    start_epoch = 0
    feedback = FeedbackEpochs.of(config, rank, world)
    checkpoint = checkpoint_to_resume(run, rank) if feedback is None else None
    if feedback is not None:  # continued: this version's own checkpoint, else the parent's
        start_epoch, _ = feedback.restore(run, model, optimizer)
    elif checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(model, optimizer, directory)
        start_epoch = state["epoch"] + 1
        if rank == 0:
            logger.info("resumed from %s at epoch %d", checkpoint.path, start_epoch)

    item_table = pa.table({"item_id": items.column("item_id")})
    item_ids = torch.from_numpy(items.column("item_id").to_numpy().astype(np.int64))
    valid_users: EvalUsers = config["valid_users"]
    shard = ray.train.get_dataset_shard("train")
    steps_cap = cfg.train.max_steps_per_epoch
    slices = facet_slices(cfg.model.dim)
    previous_codes: dict[str, torch.Tensor] = {}
    index: MFLIIndex | None = None

    # what the driver draws its progress bars from
    progress = StepProgress(run, rank, world, cfg.train.log_every, config.get("steps_per_epoch"), logger=logger)

    # 5. epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        set_mpzch_training(model, True)
        progress.start_epoch(epoch)
        t0, steps, examples, loss_sum = time.perf_counter(), 0, 0, 0.0
        parts_sum: dict[str, float] = {}
        rebalanced = {"reseeded": 0, "split": 0}
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", drop_last=True):
            if steps_cap is not None and steps >= steps_cap:
                break  # every rank breaks at the same step: shards are equal (streaming_split)
            kjt = to_kjt(batch).to(device)
            ids = kjt["item_id"].values()
            user, item = model(kjt)
            log_q_ids = log_q(ids) if log_q is not None else None
            loss, parts = mfli_loss(core.quantizers, user, item, ids, log_q_ids, cfg.model, batch_weight(batch, device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if feedback is not None:
                feedback.note(batch)
            steps += 1
            examples += batch.num_rows
            loss_sum += float(loss.detach())
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value
            if steps % cfg.model.rebalance_every == 0:
                for name, cols in slices.items():
                    done = core.quantizers[name].rebalance(item.detach()[:, cols], cfg.model.dead_share, cfg.model.split_share)
                    rebalanced = {k: rebalanced[k] + done[k] for k in rebalanced}
            progress.step(steps, examples, loss_sum / steps)
        train_s = time.perf_counter() - t0
        if feedback is not None:  # which events this epoch trained, from every rank
            feedback.end_epoch(run, epoch)

        model.eval()
        set_mpzch_training(model, False)
        metrics: dict[str, Any] = {f"valid/{k}": v for k, v in evaluate(model, item_table, valid_users, cfg.eval.ks, 512).items()}
        # the index: embed the catalogue, balance the codes on it, code and index every item
        item_emb = embed_rows(model, item_table, ["item_id"], 512, tower="item")
        for name, cols in slices.items():
            done = core.quantizers[name].rebalance(item_emb[:, cols], cfg.model.dead_share, cfg.model.split_share, gather=False)
            rebalanced = {k: rebalanced[k] + done[k] for k in rebalanced}
        index, codes = build_index(core, item_ids, item_emb, cfg.model)
        metrics.update({f"valid_mfli/{k}": v for k, v in evaluate_index(model, index, valid_users, cfg.eval.ks).items()})
        histograms = {}
        for name in FACETS:
            hist = core.quantizers[name].occupancy(codes[name])  # [L, K]
            histograms[f"mfli/{name}/occupancy"] = hist.tolist()
            metrics.update(occupancy_metrics(f"mfli/{name}", hist))
            if name in previous_codes:
                changed = (codes[name] != previous_codes[name]).any(dim=1)
                metrics[f"mfli/{name}/codes_changed"] = float(changed.float().mean())
            previous_codes[name] = codes[name]
        metrics.update({f"mfli/{k}": float(v) for k, v in rebalanced.items()})
        metrics["mfli/codebook_rank_drift"] = codebook_drift(core)
        metrics.update({k: v / max(steps, 1) for k, v in parts_sum.items()})
        metrics.update(
            epoch=epoch,
            steps=steps,
            loss=loss_sum / max(steps, 1),
            examples_per_s=examples * world / max(train_s, 1e-9),
            train_s=train_s,
        )
        metrics.update(mpzch_metrics(model))
        if rank == 0:
            run.append_metrics({**metrics, **histograms})
            logger.info(
                "epoch %d done: loss %.4f valid recall@10 exact %.4f mfli %.4f (%.0f items scored) (%.1fs)",
                epoch, metrics["loss"], metrics["valid/recall@10"], metrics["valid_mfli/recall@10"],
                metrics["valid_mfli/items_scored"], train_s,
            )
        state = {"epoch": epoch, "identities": identities_digest(model), **(feedback.train_state() if feedback else {})}
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            save_checkpoint(model, optimizer, state, tmp)
            if rank == 0:
                index.save(Path(tmp) / INDEX_IN_CHECKPOINT, {"version": f"{run.run_id}/epoch-{epoch:04d}"})
            report_checkpoint(metrics, tmp, epoch)  # two-phase: rank 0's train_state.json commits it

    # 6. test metrics and the serving artifacts
    model.eval()
    set_mpzch_training(model, False)
    test_users: EvalUsers = config["test_users"]
    if index is None:  # resumed after the last epoch: rebuild the index from the restored model
        index, _ = build_index(core, item_ids, embed_rows(model, item_table, ["item_id"], 512, tower="item"), cfg.model)
    progress.stage("test metrics", 1, 2)
    test = {f"test/{k}": v for k, v in evaluate(model, item_table, test_users, cfg.eval.ks, 512).items()}
    test.update({f"test_mfli/{k}": v for k, v in evaluate_index(model, index, test_users, cfg.eval.ks).items()})
    version = f"{run.run_id}/epoch-{cfg.train.epochs - 1:04d}"
    progress.stage("serving index", 2, 2)
    export_index(model, run, config["data_dir"], items, config["train_valid"], cfg, version)
    encoder = export_content_encoder(model, items)  # collective: new items are embedded from it
    if rank == 0:
        index.save(run.mfli_index_dir, {"version": version, "dataset": config["data_dir"]})
        encoder.save(run.mfli_index_dir / ENCODER_DIR)
        info = run.read_json(run.index_dir / "index.json")
        info.update(model="mfli", facets=list(FACETS), facet_dim=cfg.model.dim, mfli_index="mfli")
        run.write_json(run.index_dir / "index.json", info)
        run.write_json(run.eval_path, test)
        run.push()  # a run in object storage: publish index/ and eval.json
        logger.info("test: %s", {k: round(v, 4) for k, v in test.items() if "@10" in k})


# ---------------------------------------------------------------- driver
def run(cfg: MFLIRunConfig, run_id: str | None = None, config_stem: str = "run") -> RunDir:
    """Train ``cfg`` on a Ray cluster (``ray.init()`` is called when none is connected).

    Re-running with the same ``run_id`` resumes from that run's latest checkpoint.
    """
    from training.models.mfli import table_specs

    return run_retrieval_job(cfg, train_loop_per_worker, table_specs(cfg.model), run_id, config_stem)
