"""Continue a two-tower, MFLI or HSNN run on the feedback log since its watermark: the incremental recipe.

``rayrec train --continue runs/<id> --feedback data/feedback`` (or :func:`continue_run` from a
Ray Job) makes the run's next version, a new run folder ``runs/<base>-c<n+1>`` beside it:

Driver (:func:`continue_run`): the parent's config and its last committed checkpoint → that
checkpoint's watermark (``training.data.feedback``) → the feedback parts not in it → positives
as examples, histories from the run's interactions; the catalogue plus the items the app added
live (the catalogue log, ``training.data.catalogue_log``) → the new run folder → ``TorchTrainer``
with the kind's recipe (:data:`CONTINUED_BY`).

A two-tower worker (:func:`train_loop_per_worker`), top to bottom (MFLI's and HSNN's are their
own jobs' loops, ``training.jobs.train_mfli`` / ``train_hsnn``, started the same way by
``FeedbackEpochs``):

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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import pyarrow as pa
import yaml

from embeddings.tables import identities_digest, mpzch_metrics, set_mpzch_training
from training import storage
from training.checkpoint import read_train_state, report_checkpoint, save_checkpoint
from training.config import RetrievalRunConfig, load_config
from training.data.catalogue_log import ItemChange, content_table, live_state, read_catalogue
from training.data.feedback import Watermark, new_parts, positives, read_parts
from training.data.feedback_examples import feedback_examples, pad_for_workers, with_replay
from training.data.loader import LogQ, to_kjt
from training.eval.distributed import evaluate
from training.export import export_index, own_row_items
from training.failpoints import failpoint
from training.jobs.feedback_epochs import FeedbackEpochs, batch_weight
from training.jobs.launch import fit_on_ray, job_paths, start_worker, worker_run
from training.jobs.step_timing import StepTimes
from training.jobs.train_retrieval import build_trainable, train_step
from training.progress import StepProgress
from training.runs import RunDir, continued_run_id, create_run, run_dir

logger = logging.getLogger("rayrec.continue")

CONTINUED_BY = {
    "two_tower": "training.jobs.continue_retrieval",
    "mfli": "training.jobs.train_mfli",
    "hsnn": "training.jobs.train_hsnn",
}
"""The kinds ``--continue`` trains, and the module of each one's per-worker recipe
(``train_loop_per_worker``: MFLI's and HSNN's are their own job loops, started from the parent's
checkpoint by ``FeedbackEpochs``), which may also define ``continued_shared(interactions, cfg)``,
what its workers need besides the two-tower's (HSNN: its test-time-training pool). The ranker
is refused: its job has no continued form yet."""


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
    """The two-tower's continued job (MFLI's is ``train_mfli.train_loop_per_worker`` with the
    same :class:`FeedbackEpochs`)."""
    import ray.train

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
    feedback = FeedbackEpochs(config, rank, world)
    start_epoch, _ = feedback.restore(run, model, optimizer)

    items: pa.Table = config["items"]
    shard = ray.train.get_dataset_shard("train")
    progress = StepProgress(run, rank, world, cfg.train.log_every, config.get("steps_per_epoch"), logger=logger)

    # 4. epochs over the new positives
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        set_mpzch_training(model, True)  # unseen ids get rows; eviction scores them as configured
        progress.start_epoch(epoch)
        t0, steps, loss_sum = time.perf_counter(), 0, 0.0
        times = StepTimes()
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", drop_last=True):
            kjt = to_kjt(batch).to(device)
            loss = train_step(model, optimizer, kjt, log_q, cfg.model.temperature, times, batch_weight(batch, device))
            feedback.note(batch)
            steps += 1
            loss_sum += float(loss.detach())
            run.write_heartbeat(rank, epoch=epoch, step=steps, phase="train")
            progress.step(steps, feedback.trained(), loss_sum / steps)
            failpoint("continue.step", rank=rank, epoch=epoch, step=steps)
        train_s = time.perf_counter() - t0
        trained = feedback.end_epoch(run, epoch)  # which events this epoch trained, from every rank

        model.eval()
        set_mpzch_training(model, False)
        metrics = {f"valid/{k}": v for k, v in evaluate(model, own_row_items(model, items), config["valid_users"], cfg.eval.ks, 512).items()}
        metrics.update(epoch=epoch, steps=steps, loss=loss_sum / max(steps, 1), train_s=train_s,
                       feedback_events=trained, attempt=feedback.attempt, **times.as_metrics())
        metrics.update(mpzch_metrics(model))
        identities = identities_digest(model)
        if rank == 0:
            run.append_metrics(metrics)
            logger.info("epoch %d: %d feedback events, loss %.4f, valid recall@10 %.4f",
                        epoch, trained, metrics["loss"], metrics["valid/recall@10"])
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            save_checkpoint(model, optimizer, {"epoch": epoch, "identities": identities, **feedback.train_state()}, tmp)
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
    kind = (yaml.safe_load(parent.config_path.read_text()) or {}).get("kind")
    if kind not in CONTINUED_BY:  # before validating: the reason, not another kind's schema
        raise ContinueError(f"{parent.location}: continual training supports kinds {', '.join(CONTINUED_BY)}, not {kind!r}")
    cfg = load_config(parent.config_path, list(overrides))
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
        "live_items": loop_config.pop("live_items"),
    }})
    logger.info("continuing %s as %s: %d events (%d positives) in %d part(s)",
                parent.run_id, child_id, events.num_rows, new.num_rows, len(names))
    fit_on_ray(_job_module(cfg.kind).train_loop_per_worker, train_cfg, child_id,
               job_paths(child, cfg) | loop_config | {"base_checkpoint": base, "watermark": target.model_dump()},
               examples)
    return Continuation(child, f"{child.location}: trained {new.num_rows} positives of {events.num_rows} new events "
                               f"({len(names)} part(s)) from {parent.run_id}")


def _examples(cfg: RetrievalRunConfig, feedback: str, mark: Watermark, new: pa.Table) -> tuple[dict[str, Any], pa.Table, int]:
    """``(what every worker gets, padded examples, rows per worker per step)``.

    The run's interactions are the dataset's train+valid plus every positive the watermark
    already holds; the new positives extend them (histories, log-q, the export's seen items).
    The catalogue the job embeds and exports is :func:`_catalogue`'s.
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
    examples = with_replay(examples, history, cfg.continual.replay, cfg.data.history_len, cfg.seed + mark.events)
    padded, batch, _ = pad_for_workers(examples, cfg.scaling.num_workers, cfg.continual.batch_size)

    fresh = pc.unique(pa.concat_tables([trained, new.select(cols).cast(schema)]).column("item_id").combine_chunks())
    items, unseen, live = _catalogue(pq.read_table(data_dir / "items.parquet"), read_catalogue(feedback), fresh)
    everything = pa.concat_tables([history, new.select(cols).cast(schema)])
    shared = {
        "log_q": LogQ.from_interactions(everything.column("item_id")),
        "valid_users": make_eval_users(train, valid, cfg.data.history_len, cfg.eval.max_users, cfg.seed),
        "test_users": make_eval_users(train_valid, test, cfg.data.history_len, cfg.eval.max_users, cfg.seed),
        "train_valid": everything,
        "items": items,
        "new_items": unseen,
        "live_items": live,
    }
    extra = getattr(_job_module(cfg.kind), "continued_shared", None)
    if extra is not None:
        shared |= extra(everything, cfg)
    return shared, padded, batch


def _catalogue(items: pa.Table, changes: list[ItemChange], fed: pa.Array) -> tuple[pa.Table, int, int]:
    """``(catalogue, fed ids without content, live items)``: what a continued job embeds.

    The dataset's items (``item_id, title, year, genres``), then the items the app added live
    (the catalogue log's adds still standing, with their content: MFLI's item tower reads it,
    so a live item with no event yet still gets a content vector, and one with events trains
    its id row; serving then keeps the trained vector, ``serving.live_items``), then ids the
    feedback holds that neither names (content unknown: empty). Items removed live stay in: the
    replayed log removes them from the served index.
    """
    import pyarrow.compute as pc

    known = items.column("item_id").combine_chunks()
    adds = [c for c in live_state(changes).values() if not c.removed]
    added = content_table(adds).append_column("item_id", pa.array([c.item_id for c in adds], pa.int64()))
    added = added.filter(pc.invert(pc.is_in(added.column("item_id"), value_set=known)))
    known = pa.concat_arrays([known, added.column("item_id").combine_chunks()])
    unseen = pc.filter(fed, pc.invert(pc.is_in(fed, value_set=known))).sort().cast(pa.int64())
    rest = pa.table({"item_id": unseen})
    table = pa.concat_tables([items, added.select(items.column_names).cast(items.schema), rest], promote_options="default")
    return table, len(unseen), added.num_rows


def _job_module(kind: str) -> Any:
    """The module whose ``train_loop_per_worker`` continues a run of ``kind``."""
    import importlib

    return importlib.import_module(CONTINUED_BY[kind])


def _newest_version(run: RunDir) -> RunDir:
    """``run``, or the newest finished version continued from it (``<base>-c<n>``, by id)."""
    parent_dir = run.location.rstrip("/").rsplit("/", 1)[0]
    while True:
        child = run_dir(parent_dir, continued_run_id(run.run_id))
        if child.read_published("index/index.json") is None:
            return run.pull()
        logger.info("%s has a newer version: continuing %s", run.run_id, child.run_id)
        run = child

