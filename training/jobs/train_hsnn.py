"""Train HSNN (tree + MoNN scorer, learned jointly) with Ray Train: the recipe.

The driver and the data path are the two-tower job's (``training/jobs/train_retrieval.py``):
the same examples, log-q, eval users and run folder; the driver also samples the test-time
training pool. Per worker:

1. device and seed
2. model: MPZCH tables on "meta" + towers + MoNN scorer + residual quantizer → DMP (tables
   row-wise; dense parts DDP; codebooks are buffers kept identical by all-reduced EMA); with
   ``model.content`` the item tower reads each item's content tokens (set on every rank)
3. optimizer: fused row-wise Adagrad for the tables, AdamW for the dense parts
4. restore the latest checkpoint (network, tables, codebooks; the tree beside them); a
   continued job (``rayrec train --continue``) starts from its parent's instead, trains the new
   feedback positives (zero-weight padding rows train nothing) and commits the watermark with
   the checkpoint (``training.jobs.feedback_epochs``)
5. per epoch: train (item + node + commitment losses, codebook re-seeding every
   ``model.rebalance_every`` steps); then embed the catalogue, place the items that have no
   training example by their content (:class:`ColdPlacement`), rebalance the codebooks on it,
   re-assign every item (share of items that changed leaf logged), log node sizes and
   entropy, evaluate beam search and exhaustive MoNN scoring, save checkpoint + tree, report
6. at the end: test metrics (``eval.json``), the dot-product serving files (``index/``, for
   ``rayrec eval`` and serving fallbacks) and the HSNN index (``index/hsnn/``: tree, item
   vectors, scorer, every user's pack, the content placer for cold items, the TTT pool)

Every collective (DMP forward, EMA all-reduce, rebalance, report) runs the same number of
times on every rank.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator
from torch import nn

from embeddings.tables import identities_digest, mpzch_metrics, set_mpzch_training
from training.checkpoint import checkpoint_to_resume, load_checkpoint, report_checkpoint, save_checkpoint
from training.config import ContinualConfig, RetrievalRunBase, two_tower_only
from training.data.eval_sets import EvalUsers
from training.data.loader import LogQ, to_kjt, user_histories
from training.eval.distributed import embed_rows, evaluate_retriever
from training.export import export_index
from training.index.hsnn_index import HSNNIndex
from training.jobs.feedback_epochs import FeedbackEpochs, batch_weight
from training.jobs.launch import run_retrieval_job, start_worker, worker_run
from training.progress import StepProgress
from training.models.hsnn import HSNNModelConfig, LossInputs
from training.models.hsnn_tree import (
    ContentPlacer,
    HSNNTree,
    content_matrix,
    content_vocabulary,
    tree_metrics,
)
from training.models.hsnn_ttt import TTTConfig, TTTPool
from training.models.item_content import ItemContent
from training.runs import RunDir

logger = logging.getLogger("rayrec.train")

TREE_IN_CHECKPOINT = "hsnn_tree"
"""Sub-folder of each checkpoint holding that epoch's tree (written by rank 0)."""


class HSNNRunConfig(RetrievalRunBase):
    """``kind: hsnn``: HSNN over MPZCH tables (training/jobs/train_hsnn.py)."""

    kind: Literal["hsnn"] = "hsnn"
    model: HSNNModelConfig = Field(default_factory=HSNNModelConfig)
    ttt: TTTConfig = Field(default_factory=TTTConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)

    _two_tower_only = model_validator(mode="after")(two_tower_only)


CONFIG = HSNNRunConfig


class DotView(nn.Module):
    """The HSNN's user and item vectors alone (``[B, D]`` each), for the dot-product ``index/`` files."""

    def __init__(self, model: nn.Module, dim: int) -> None:
        super().__init__()
        self.model, self.dim = model, dim

    def forward(self, kjt):
        user, item = self.model(kjt)
        return (None if user is None else user[:, : self.dim]), (None if item is None else item[:, : self.dim])


# ---------------------------------------------------------------- index and its evaluation
@dataclass
class ColdPlacement:
    """What places the catalogue's untrained items by their content instead of their id row.

    Why: an item with no training interaction has an id row that was never inserted into its
    MPZCH table, so its tower output is noise shared by every such item: on the 1M-item
    synthetic catalogue the ~700k of them fell into one leaf (56% of the catalogue). A ridge
    fit from content to the trained items' vectors (:class:`ContentPlacer`) puts each of them
    where trained items with the same content sit, as a brand-new item would be placed.

    Args:
        content: ``[N, C]`` multi-hot content of the catalogue (ascending item id).
        vocabulary: the content feature names (columns of ``content``).
        trained: ``[N]`` bool, items with at least one training example.
    """

    content: torch.Tensor
    vocabulary: list[str]
    trained: torch.Tensor


@torch.no_grad()
def build_index(model, core, item_table: pa.Table, cfg: HSNNModelConfig, cold: ColdPlacement | None = None) -> tuple[HSNNIndex, ContentPlacer | None]:
    """Embed the catalogue (collective), place untrained items by content, rebalance the
    codebooks on it and code every item. Returns the index and the content placer (fit on the
    trained items; None without ``cold``)."""
    packs = embed_rows(model, item_table, ["item_id"], 512, tower="item")  # [N, 2D]
    vectors, keys = packs[:, : cfg.dim].clone(), packs[:, cfg.dim :]
    placer = None
    if cold is not None and bool(cold.trained.any()):
        placer = ContentPlacer.fit(cold.content[cold.trained], vectors[cold.trained], cold.vocabulary)
        if not bool(cold.trained.all()):
            vectors[~cold.trained] = placer.predict(cold.content[~cold.trained])
    core.quantizer.rebalance(vectors, cfg.dead_share, cfg.split_share, gather=False)  # same pool on every rank
    item_ids = torch.from_numpy(item_table.column("item_id").to_numpy().astype(np.int64))  # ascending
    tree = HSNNTree.build(core.quantizer.codebooks, item_ids, vectors, cfg.max_leaf_ratio)
    return HSNNIndex(copy.deepcopy(core.scorer), tree, vectors, keys, cfg.beam, cfg.node_scoring), placer


def evaluate_index(index: HSNNIndex, packs: torch.Tensor, users: EvalUsers, ks: list[int]) -> dict[str, float]:
    """Leave-one-out metrics of one HSNN search mode (users split over ranks, sums all-reduced)."""
    return evaluate_retriever(index, packs, users, ks)


def evaluate_both(model, index: HSNNIndex, users: EvalUsers, ks: list[int], split: str) -> dict[str, float]:
    """Beam search and exhaustive MoNN metrics, keys ``<split>_beam/...`` and ``<split>_exhaustive/...``."""
    packs = embed_rows(model, users.histories, ["user_id", "history"], 512, tower="user")  # [U, D + T]
    out = {f"{split}_beam/{k}": v for k, v in evaluate_index(index, packs, users, ks).items()}
    out.update({f"{split}_exhaustive/{k}": v for k, v in evaluate_index(index.with_beam(None), packs, users, ks).items()})
    return out


# ---------------------------------------------------------------- the per-worker recipe
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train

    from embeddings.sharding import combined_optimizer, shard_model
    from training.models.hsnn import build_hsnn, table_specs

    cfg = HSNNRunConfig.model_validate(config["cfg"])
    run, data_dir = worker_run(config)
    # 1. rank, device, seeds and threads
    worker = start_worker(cfg)
    rank, world, device = worker.rank, worker.world, worker.device

    # 2. model: tables on "meta" so DMP allocates only this rank's rows
    # the catalogue with its content: the dataset's, or a continued job's (plus the live items)
    items = (config["items"] if "items" in config else pq.read_table(data_dir / "items.parquet")).sort_by("item_id")
    item_table = pa.table({"item_id": items.column("item_id")})
    model = build_hsnn(cfg.model, torch.device("meta"), cfg.data.history_len)
    catalogue = torch.from_numpy(items.column("item_id").to_numpy().astype(np.int64))  # ascending
    model.set_catalogue(catalogue)
    model = shard_model(model, table_specs(cfg.model), device, cfg.train.embedding_optimizer, cfg.train.embedding_lr)
    core = model.module  # the unwrapped HSNN: scorer and quantizer live here
    if cfg.model.content:
        core.set_content(ItemContent.from_items(items))
    # 3. optimizer
    optimizer = combined_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    log_q: LogQ | None = config["log_q"] if cfg.model.logq_correction else None
    vocabulary = content_vocabulary(items)  # untrained items are placed by content (ColdPlacement)
    cold = ColdPlacement(content_matrix(items, vocabulary), vocabulary, torch.isin(catalogue, config["log_q"].item_ids))

    # 4. restore (a registered, committed checkpoint only; rank 0 removes what an interrupted save left)
    start_epoch, previous_tree = 0, None
    feedback = FeedbackEpochs.of(config, rank, world)
    checkpoint = checkpoint_to_resume(run, rank) if feedback is None else None
    if feedback is not None:  # continued: this version's own checkpoint, else the parent's
        start_epoch, previous_tree = feedback.restore(run, model, optimizer, lambda d: HSNNTree.load(d / TREE_IN_CHECKPOINT))
    elif checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(model, optimizer, directory)
            previous_tree = HSNNTree.load(Path(directory) / TREE_IN_CHECKPOINT)
        start_epoch = state["epoch"] + 1
        if rank == 0:
            logger.info("resumed from %s at epoch %d", checkpoint.path, start_epoch)

    valid_users: EvalUsers = config["valid_users"]
    shard = ray.train.get_dataset_shard("train")
    steps_cap = cfg.train.max_steps_per_epoch
    index: HSNNIndex | None = None
    # what the driver draws its progress bars from
    progress = StepProgress(run, rank, world, cfg.train.log_every, config.get("steps_per_epoch"), logger=logger)

    # 5. epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        set_mpzch_training(model, True)
        progress.start_epoch(epoch)
        t0, steps, examples, loss_sum = time.perf_counter(), 0, 0, 0.0
        parts_sum: dict[str, float] = {}
        reseeded = {"reseeded": 0, "split": 0}
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", drop_last=True):
            if steps_cap is not None and steps >= steps_cap:
                break  # every rank breaks at the same step: shards are equal (streaming_split)
            kjt = to_kjt(batch).to(device)
            ids = kjt["item_id"].values()
            weight = batch_weight(batch, device)
            loss, parts, item_vectors = model(kjt, LossInputs(log_q(ids) if log_q is not None else None, cfg.model, weight))
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
            if steps % cfg.model.rebalance_every == 0:  # (a padded batch's copies of its last row count here too)
                done = core.quantizer.rebalance(item_vectors, cfg.model.dead_share, cfg.model.split_share)
                reseeded = {k: reseeded[k] + done[k] for k in reseeded}
            progress.step(steps, examples, loss_sum / steps)
        train_s = time.perf_counter() - t0
        if feedback is not None:  # which events this epoch trained, from every rank
            feedback.end_epoch(run, epoch)

        # re-assign every item with the current codebooks; measure the tree; evaluate
        model.eval()
        set_mpzch_training(model, False)
        index, placer = build_index(model, core, item_table, cfg.model, cold)
        metrics: dict[str, Any] = tree_metrics(index.tree)
        metrics["hsnn/content_placed_share"] = float((~cold.trained).float().mean())
        if previous_tree is not None:
            metrics["hsnn/changed_share"] = index.tree.changed_share(previous_tree)
        previous_tree = index.tree
        metrics.update(evaluate_both(model, index, valid_users, cfg.eval.ks, "valid"))
        metrics.update({f"hsnn/{k}": float(v) for k, v in reseeded.items()})
        metrics.update({k: v / max(steps, 1) for k, v in parts_sum.items()})
        metrics.update(
            epoch=epoch, steps=steps, loss=loss_sum / max(steps, 1),
            examples_per_s=examples * world / max(train_s, 1e-9), train_s=train_s,
        )
        metrics.update(mpzch_metrics(model))
        if rank == 0:
            sizes = {f"hsnn/l{level}/sizes": index.tree.node_sizes(level).tolist() for level in range(index.tree.levels)}
            run.append_metrics({**metrics, **sizes})
            logger.info(
                "epoch %d done: loss %.4f valid recall@10 beam %.4f exhaustive %.4f, leaf entropy %.3f, changed %.3f (%.1fs)",
                epoch, metrics["loss"], metrics["valid_beam/recall@10"], metrics["valid_exhaustive/recall@10"],
                metrics[f"hsnn/l{cfg.model.levels - 1}/entropy"], metrics.get("hsnn/changed_share", float("nan")), train_s,
            )
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            state = {"epoch": epoch, "identities": identities_digest(model), **(feedback.train_state() if feedback else {})}
            save_checkpoint(model, optimizer, state, tmp)
            if rank == 0:
                index.tree.save(Path(tmp) / TREE_IN_CHECKPOINT)
            report_checkpoint(metrics, tmp, epoch)  # two-phase: rank 0's train_state.json commits it

    # 6. test metrics and the serving artifacts
    model.eval()
    set_mpzch_training(model, False)
    if index is None:  # resumed after the last epoch: rebuild the index from the restored model
        index, placer = build_index(model, core, item_table, cfg.model, cold)
    progress.stage("test metrics", 1, 2)
    test = evaluate_both(model, index, config["test_users"], cfg.eval.ks, "test")
    version = f"{run.run_id}/epoch-{cfg.train.epochs - 1:04d}"
    progress.stage("serving index", 2, 2)
    export_index(DotView(model, cfg.model.dim), run, config["data_dir"], items, config["train_valid"], cfg, version)
    histories = user_histories(config["train_valid"], cfg.data.history_len)
    user_packs = embed_rows(model, histories, ["user_id", "history"], 512, tower="user")  # [U, D + T]
    pool: pa.Table = config["ttt_pool"]
    pool_packs = embed_rows(model, pool, ["user_id", "history"], 512, tower="user")  # [P, D + T]
    if rank == 0:
        folder = run.index_dir / "hsnn"
        index.save(folder, {"version": version, "dataset": config["data_dir"], "history_len": cfg.data.history_len,
                            "ttt": cfg.ttt.model_dump()})  # what serving's retriever_ttt fine-tunes with
        user_ids = torch.from_numpy(histories.column("user_id").to_numpy().astype(np.int64))
        torch.save({"user_ids": user_ids, "packs": user_packs}, folder / "users.pt")
        targets = torch.searchsorted(index.tree.item_ids, torch.from_numpy(pool.column("item_id").to_numpy().astype(np.int64)))
        TTTPool(pool_packs, targets).save(folder)
        placer.save(folder)
        info = run.read_json(run.index_dir / "index.json")
        info.update(model="hsnn", hsnn_index="hsnn")
        run.write_json(run.index_dir / "index.json", info)
        run.write_json(run.eval_path, test)
        run.push()  # a run in object storage: publish index/ and eval.json
        logger.info("test: %s", {k: round(v, 4) for k, v in test.items() if "@10" in k})


# ---------------------------------------------------------------- driver
def run(cfg: HSNNRunConfig, run_id: str | None = None, config_stem: str = "run") -> RunDir:
    """Train ``cfg`` on a Ray cluster (``ray.init()`` is called when none is connected).

    Re-running with the same ``run_id`` resumes from that run's latest checkpoint.
    """
    from training.models.hsnn import table_specs

    def ttt_pool(examples: pa.Table) -> dict[str, pa.Table]:  # the examples are already a seeded shuffle
        return {"ttt_pool": examples.slice(0, min(cfg.ttt.pool_size, examples.num_rows))}

    return run_retrieval_job(cfg, train_loop_per_worker, table_specs(cfg.model), run_id, config_stem, ttt_pool)


def continued_shared(interactions: pa.Table, cfg: HSNNRunConfig) -> dict[str, Any]:
    """What a continued job's workers get besides the two-tower's (``continue_retrieval``): the
    test-time-training pool, ``ttt.pool_size`` examples of every interaction the new version
    knows (the dataset's, the feedback already trained and the new), a seeded sample."""
    from training.data.loader import build_examples

    examples = build_examples(interactions, cfg.data.history_len)
    order = np.random.default_rng(cfg.seed).permutation(examples.num_rows)[: cfg.ttt.pool_size]
    return {"ttt_pool": examples.take(pa.array(np.sort(order))).select(["user_id", "item_id", "history"])}
