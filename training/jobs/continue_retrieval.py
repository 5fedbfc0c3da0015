"""Continue a two-tower run on the feedback log since its watermark: the incremental recipe.

``rayrec train --continue runs/<id> --feedback data/feedback`` (or :func:`continue_run` from a
Ray Job) makes the run's next version, a new run folder ``runs/<base>-c<n+1>`` beside it:

Driver (:func:`continue_run`): the parent's config and its last committed checkpoint → that
checkpoint's watermark (``training.data.feedback``) → the feedback parts not in it → positives
as examples, histories from the run's interactions → the new run folder → ``TorchTrainer``.

Each worker (:func:`train_loop_per_worker`), top to bottom:

1. device and seed
2. model and optimizer, as the two-tower job builds them (MPZCH tables sharded row-wise)
3. restore: this version's own latest checkpoint if a restart left one, else the parent's
4. per epoch over the new positives: train (MPZCH admits unseen ids, eviction as configured),
   record which events were trained (``feedback_trained``), evaluate, save the checkpoint with
   the new watermark in its commit record and report
5. test metrics and the serving index, versioned ``<new run id>/epoch-<e>``

Exactly once: the watermark lives in ``train_state.json``, the commit record that
``training.checkpoint`` writes last, so a checkpoint has the model trained on the new events
and the watermark past them, or neither. A job killed before the commit leaves the parent's
checkpoint as the newest: the rerun (or Ray Train's restart) trains the same events again from
the same weights, and the killed attempt's training is gone with its process. A rerun after
the commit resumes this version's checkpoint and trains what is left of its epochs on the
events its watermark names, never new ones.
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from embeddings.tables import identities_digest, mpzch_metrics, set_mpzch_training
from training import storage
from training.checkpoint import checkpoint_to_resume, load_checkpoint, read_train_state, report_checkpoint, save_checkpoint
from training.config import RetrievalRunConfig, load_config
from training.data.feedback import Watermark, new_parts, positives, read_parts
from training.data.feedback_examples import feedback_examples, pad_for_workers
from training.data.loader import LogQ, to_kjt
from training.eval.distributed import evaluate
from training.export import export_index, own_row_items
from training.failpoints import failpoint
from training.jobs.launch import fit_on_ray, job_paths, start_worker, worker_run
from training.jobs.step_timing import StepTimes
from training.jobs.train_retrieval import build_trainable, train_step
from training.progress import StepProgress
from training.runs import RunDir, continued_run_id, create_run, run_dir

logger = logging.getLogger("rayrec.continue")


class ContinueError(RuntimeError):
    """A run that cannot be continued (no checkpoint, another kind, ...); the message says why."""


@dataclass(frozen=True)
class Continuation:
    """What ``--continue`` did.

    Args:
        run: the new version's run folder; None when there was nothing to train.
        message: one line for the person or the schedule that asked.
    """

    run: Optional[RunDir]
    message: str


# ---------------------------------------------------------------- the per-worker recipe
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    cfg = RetrievalRunConfig.model_validate(config["cfg"])
    run, _ = worker_run(config)
    # 1. rank, device, seeds and threads
    worker = start_worker(cfg)
    rank, world, device = worker.rank, worker.world, worker.device

    # 2. model and optimizer (tables sharded row-wise across the workers)
    model, optimizer = build_trainable(cfg, device)
    log_q: Optional[LogQ] = config["log_q"] if cfg.model.logq_correction else None

    # 3. restore: a restart of this version resumes its own committed checkpoint (its
    #    watermark is this job's); a fresh start loads the parent's
    own = checkpoint_to_resume(run, rank)
    source = own if own is not None else _checkpoint_at(config["base_checkpoint"])
    with source.as_directory() as directory:
        state = load_checkpoint(model, optimizer, directory)
    start_epoch = state["epoch"] + 1 if own is not None else 0
    if identities_digest(model) != state["identities"]:
        raise RuntimeError(f"MPZCH identities after restoring {source.path} differ from its train state")
    attempt = _attempt_id(rank)
    if rank == 0:
        run.append_metrics({"event": "continue_started", "attempt": attempt, "from": source.path, "epoch": start_epoch,
                            "world_size": world})

    items: pa.Table = config["items"]
    shard = ray.train.get_dataset_shard("train")
    progress = StepProgress(run, rank, world, cfg.train.log_every, config.get("steps_per_epoch"), logger=logger)

    # 4. epochs over the new positives
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        set_mpzch_training(model, True)  # unseen ids get rows; eviction scores them as configured
        progress.start_epoch(epoch)
        t0, steps, loss_sum, trained = time.perf_counter(), 0, 0.0, []
        times = StepTimes()
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", drop_last=True):
            kjt = to_kjt(batch).to(device)
            weight = torch.from_numpy(np.array(batch.column("weight"), dtype=np.float32)).to(device)  # [b], 0 = padding
            loss = train_step(model, optimizer, kjt, log_q, cfg.model.temperature, times, weight)
            seq = np.array(batch.column("seq"), dtype=np.int64)
            trained.append(seq[seq >= 0])
            steps += 1
            loss_sum += float(loss.detach())
            run.write_heartbeat(rank, epoch=epoch, step=steps, phase="train")
            progress.step(steps, int(sum(len(s) for s in trained)), loss_sum / steps)
            failpoint("continue.step", rank=rank, epoch=epoch, step=steps)
        train_s = time.perf_counter() - t0

        # which events this epoch trained, from every rank: the record an audit counts
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, np.concatenate(trained) if trained else np.zeros(0, np.int64))
        seqs = np.sort(np.concatenate(everyone))
        if rank == 0:
            run.append_metrics({"event": "feedback_trained", "attempt": attempt, "epoch": epoch,
                                "events": int(len(seqs)), "seq_ranges": _ranges(seqs)})

        model.eval()
        set_mpzch_training(model, False)
        metrics = {f"valid/{k}": v for k, v in evaluate(model, own_row_items(model, items), config["valid_users"], cfg.eval.ks, 512).items()}
        metrics.update(epoch=epoch, steps=steps, loss=loss_sum / max(steps, 1), train_s=train_s,
                       feedback_events=int(len(seqs)), attempt=attempt, **times.as_metrics())
        metrics.update(mpzch_metrics(model))
        identities = identities_digest(model)
        if rank == 0:
            run.append_metrics(metrics)
            logger.info("epoch %d: %d feedback events, loss %.4f, valid recall@10 %.4f",
                        epoch, len(seqs), metrics["loss"], metrics["valid/recall@10"])
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            train_state = {"epoch": epoch, "identities": identities, "watermark": config["watermark"],
                           "attempt": attempt, "parent_checkpoint": config["base_checkpoint"]}
            save_checkpoint(model, optimizer, train_state, tmp)
            report_checkpoint(metrics, tmp, epoch)  # the watermark commits with the model, in train_state.json

    # 5. test metrics and the serving index of this version
    model.eval()
    set_mpzch_training(model, False)
    progress.stage("test metrics", 1, 2)
    test = {f"test/{k}": v for k, v in evaluate(model, own_row_items(model, items), config["test_users"], cfg.eval.ks, 512).items()}
    progress.stage("serving index", 2, 2)
    version = f"{run.run_id}/epoch-{cfg.train.epochs - 1:04d}"
    export_index(model, run, config["data_dir"], items, config["train_valid"], cfg, version)
    if rank == 0:
        run.write_json(run.eval_path, test)
        run.push()


def _checkpoint_at(location: str) -> Any:
    """A ``ray.train.Checkpoint`` of a committed folder (a local path or a URI)."""
    from ray.train import Checkpoint

    filesystem, path = storage.resolve(location)
    return Checkpoint(path=path, filesystem=filesystem)


def _attempt_id(rank: int) -> str:
    """One id per worker group (rank 0's, broadcast): what tells a killed attempt's records
    from the one whose checkpoint committed."""
    import torch.distributed as dist

    box = [uuid.uuid4().hex[:12] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _ranges(seqs: np.ndarray) -> list[list[int]]:
    """Sorted ints → inclusive ``[first, last]`` runs, a repeat starting a new run:
    ``[0, 1, 2, 2, 5]`` → ``[[0, 2], [2, 2], [5, 5]]``."""
    runs: list[list[int]] = []
    for s in seqs.tolist():
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return runs


# ---------------------------------------------------------------- driver
def continue_run(
    run_location: str,
    feedback: str,
    overrides: Sequence[str] = (),
    run_id: Optional[str] = None,
    runs_dir: Optional[str] = None,
) -> Continuation:
    """Train the newest version of the run at ``run_location`` on the feedback since its
    watermark, and export the result as the next version (a Ray cluster is joined, or a local
    one started, only when there is something to train).

    Args:
        run_location: a run folder or URI (``runs/tiny``). When it has been continued already,
            its newest version is the one continued (so a schedule can always name the first).
        feedback: the feedback log: serving's folder or its archive URI.
        overrides: ``key=value`` changes to the run's config (``continual.epochs=2``).
        run_id: the new version's run id (default: ``<base>-c<n+1>``, see ``continued_run_id``).
        runs_dir: where the new version goes (default: beside the parent).

    Raises:
        ContinueError / FeedbackError / ConfigError: with a message naming the run or file.
    """
    parent = _newest_version(RunDir.open(run_location))
    if not parent.config_path.is_file():
        raise ContinueError(f"{parent.location}: not a run folder (no config.yaml)")
    cfg = load_config(parent.config_path, list(overrides))
    if cfg.kind != "two_tower":
        raise ContinueError(f"{parent.location}: continual training supports kind two_tower, not {cfg.kind!r}")
    checkpoints = parent.checkpoints()
    if not checkpoints:
        raise ContinueError(f"{parent.location}: no committed checkpoint to continue from")
    base = str(checkpoints[-1])
    mark = Watermark.from_train_state(read_train_state(base))
    feedback = storage.normalize(feedback)
    runs_dir = storage.normalize(runs_dir) if runs_dir else parent.location.rstrip("/").rsplit("/", 1)[0]
    cfg = cfg.model_copy(update={"runs_dir": runs_dir})
    child_id = run_id or continued_run_id(parent.run_id)
    child = run_dir(runs_dir, child_id)
    if child.read_published("index/index.json") is not None:
        raise ContinueError(f"{child.location} already exists and is finished; continue it, or pick another --run-id")

    # which parts: a restart after a commit keeps the events its checkpoint names; else all new ones
    committed = child.checkpoints() if storage.exists(child.location) else []
    if committed:
        names = sorted(set(Watermark.from_train_state(read_train_state(committed[-1])).parts) - set(mark.parts))
    else:
        names = new_parts(feedback, mark)
    if not names:
        return Continuation(None, f"{parent.location}: no new feedback in {feedback} since its watermark "
                                  f"({len(mark.parts)} parts, {mark.events} events trained); nothing to do")
    events = read_parts(feedback, names)
    new = positives(events, cfg.continual.positives)
    if new.num_rows == 0:
        return Continuation(None, f"{parent.location}: {events.num_rows} new feedback events in {len(names)} part(s), "
                                  f"none of {cfg.continual.positives}; nothing to train, watermark unchanged")
    target = mark.advanced(names, events)

    loop_config, examples, batch = _examples(cfg, feedback, mark, new)
    train_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"batch_size": batch, "epochs": cfg.continual.epochs, "max_steps_per_epoch": None})})
    child = create_run(cfg, runs_dir, child_id, cfg.scaling.num_workers)
    meta = child.read_json(child.meta_path)
    child.write_json(child.meta_path, {**meta, "continued_from": {
        "run": parent.location, "checkpoint": base, "feedback": feedback, "parts": names,
        "events": events.num_rows, "positives": new.num_rows, "new_items": loop_config.pop("new_items"),
    }})
    logger.info("continuing %s as %s: %d events (%d positives) in %d part(s)",
                parent.run_id, child_id, events.num_rows, new.num_rows, len(names))
    fit_on_ray(train_loop_per_worker, train_cfg, child_id,
               job_paths(child, cfg) | loop_config | {"base_checkpoint": base, "watermark": target.model_dump()},
               examples)
    return Continuation(child, f"{child.location}: trained {new.num_rows} positives of {events.num_rows} new events "
                               f"({len(names)} part(s)) from {parent.run_id}")


def _examples(cfg: RetrievalRunConfig, feedback: str, mark: Watermark, new: pa.Table) -> tuple[dict[str, Any], pa.Table, int]:
    """``(what every worker gets, padded examples, rows per worker per step)``.

    The run's interactions are the dataset's train+valid plus every positive the watermark
    already holds; the new positives extend them (histories, log-q, the export's seen items),
    and their unseen item ids join the catalogue the export embeds.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.data.eval_sets import make_eval_users, read_split

    data_dir = storage.local_path(cfg.data.path)
    train, valid, test = (read_split(data_dir, split) for split in ("train", "valid", "test"))
    cols = ["user_id", "item_id", "timestamp"]
    schema = pa.schema([(c, pa.int64()) for c in cols])  # the splits' columns are non-null, the log's nullable
    train_valid = pa.concat_tables([train.select(cols).cast(schema), valid.select(cols).cast(schema)])
    trained = positives(read_parts(feedback, mark.parts), cfg.continual.positives).select(cols).cast(schema)
    history = pa.concat_tables([train_valid, trained])
    examples = feedback_examples(history, new, cfg.data.history_len)
    padded, batch, _ = pad_for_workers(examples, cfg.scaling.num_workers, cfg.continual.batch_size)

    catalogue = pq.read_table(data_dir / "items.parquet", columns=["item_id"]).column("item_id").combine_chunks()
    fresh = pc.unique(pa.concat_tables([trained, new.select(cols).cast(schema)]).column("item_id").combine_chunks())
    unseen = pc.filter(fresh, pc.invert(pc.is_in(fresh, value_set=catalogue))).sort()
    items = pa.table({"item_id": pa.concat_arrays([catalogue, unseen.cast(pa.int64())])})
    everything = pa.concat_tables([history, new.select(cols).cast(schema)])
    shared = {
        "log_q": LogQ.from_interactions(everything.column("item_id")),
        "valid_users": make_eval_users(train, valid, cfg.data.history_len, cfg.eval.max_users, cfg.seed),
        "test_users": make_eval_users(train_valid, test, cfg.data.history_len, cfg.eval.max_users, cfg.seed),
        "train_valid": everything,
        "items": items,
        "new_items": len(unseen),
    }
    return shared, padded, batch


def _newest_version(run: RunDir) -> RunDir:
    """``run``, or the newest finished version continued from it (``<base>-c<n>``, by id)."""
    parent_dir = run.location.rstrip("/").rsplit("/", 1)[0]
    while True:
        child = run_dir(parent_dir, continued_run_id(run.run_id))
        if child.read_published("index/index.json") is None:
            return run.pull()
        logger.info("%s has a newer version: continuing %s", run.run_id, child.run_id)
        run = child

