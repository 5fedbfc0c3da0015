"""Sharded checkpoints: save on N ranks, load on M (TorchRec re-plans, DCP reshards), atomically.

A checkpoint folder holds ``torch.distributed.checkpoint`` shards of ``{"model", "optim"}``
(the tables' rows, MPZCH identities and metadata, the fused optimizer's state, the dense
weights and AdamW state), any extra files a job adds (an index, a tree), and
``train_state.json`` (epoch, digests). Every rank saves into its own temp folder and
:func:`report_checkpoint` hands it to Ray Train, which copies every rank's files into one
``<run>/checkpoint_*`` folder and registers it once all ranks have reported.

Atomicity: a process killed during a save must leave the previous checkpoint loadable and the
interrupted one never loaded. Ray Train only restores a checkpoint it registered, and it
registers one only after every rank reported it; but an interrupted save can leave a partial
``checkpoint_*`` folder behind (rank 0 killed after the ranks agreed on the folder name: the
other ranks' shards and nothing else). So the upload is a two-phase commit:

1. every rank but 0 copies its files into the folder; barrier;
2. rank 0 copies its files (DCP ``.metadata``, its shards, the extras), then
   ``train_state.json`` last: the commit record;
3. rank 0 waits until the controller registered the checkpoint (at most one controller poll,
   ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s), so a save killed at epoch N restarts from
   epoch N-1's checkpoint, never from an older one.

:func:`is_complete` accepts a folder only with a readable ``train_state.json`` and every shard
file the DCP metadata names, at full length; :func:`load_checkpoint` refuses anything else, and
:func:`remove_incomplete_checkpoints` (rank 0, when a worker group starts, through
:func:`checkpoint_to_resume`) deletes the partial
folders an interrupted save left. ``training.failpoints`` kills a rank at each step of the save
in tests (``checkpoint.after_shards``, ``checkpoint.before_report``, ``checkpoint.upload``,
``checkpoint.before_commit``).
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from training import storage
from training.failpoints import failpoint

if TYPE_CHECKING:
    from training.runs import RunDir

TRAIN_STATE = "train_state.json"
logger = logging.getLogger("rayrec.checkpoint")


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder that an interrupted save left partial was about to be loaded."""


def save_checkpoint(model: torch.nn.Module, optimizer: Any | None, state: dict[str, Any], directory: str | Path) -> None:
    """Every rank writes its shards; rank 0 writes the train state (call on all ranks).
    ``optimizer`` None saves the model only (``training.early_stop``'s copy of the best weights)."""
    shards: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        shards["optim"] = optimizer.state_dict()
    dcp.save(shards, checkpoint_id=str(directory))
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(directory, TRAIN_STATE).write_text(json.dumps(state))


def load_checkpoint(model: torch.nn.Module, optimizer: Any | None, directory: str | Path) -> dict[str, Any]:
    """Load a checkpoint into this model (any world size); returns the train state.

    ``optimizer`` None loads the model only (inference). Raises
    :class:`IncompleteCheckpointError` for a folder that is not :func:`is_complete`.
    """
    reason = incomplete_reason(directory)
    if reason is not None:
        raise IncompleteCheckpointError(f"refusing to load checkpoint {directory}: {reason}")
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(directory))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return json.loads(Path(directory, TRAIN_STATE).read_text())


def read_train_state(directory: str | Path) -> dict[str, Any]:
    """The train state (commit record) of a committed checkpoint folder, a local path or a URI."""
    return json.loads(storage.read_bytes(storage.join(directory, TRAIN_STATE)))


def is_complete(directory: str | Path) -> bool:
    """Whether a checkpoint folder was committed: see :func:`incomplete_reason`."""
    return incomplete_reason(directory) is None


def incomplete_reason(directory: str | Path) -> Optional[str]:
    """None for a committed checkpoint folder (a local path or a URI), else what is missing.

    Committed: ``train_state.json`` (written last) parses, DCP's ``.metadata`` reads, and every
    shard file the metadata names exists and is at least as long as the bytes it indexes.
    """
    try:
        json.loads(storage.read_bytes(storage.join(directory, TRAIN_STATE)))
    except FileNotFoundError:
        return f"no {TRAIN_STATE} (the commit record, written last)"
    except (OSError, ValueError) as e:
        return f"unreadable {TRAIN_STATE} ({e})"
    try:
        # what dcp.FileSystemReader.read_metadata does, through pyarrow.fs so a URI works too
        metadata = pickle.loads(storage.read_bytes(storage.join(directory, ".metadata")))
    except Exception as e:  # missing or truncated pickle
        return f"unreadable DCP .metadata ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    sizes = {entry.base_name: entry.size for entry in storage.list_dir(directory) if entry.type == storage.pafs.FileType.File}
    for name, size in sorted(needed.items()):
        if name not in sizes:
            return f"shard {name} missing"
        if sizes[name] < size:
            return f"shard {name} truncated ({sizes[name]} of {size} bytes)"
    return None


def report_checkpoint(metrics: dict[str, Any], directory: str | Path, epoch: int) -> None:
    """Report ``metrics`` with this rank's checkpoint folder to Ray Train (call on all ranks,
    after :func:`save_checkpoint` and any extra files), committing it in two phases; returns
    once Ray Train registered it.

    ``directory`` is a temp folder this function may change (it moves ``train_state.json``).
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointConsistencyMode

    rank = dist.get_rank()
    failpoint("checkpoint.after_shards", rank=rank, epoch=epoch)
    dist.barrier()  # every rank's local folder is complete
    failpoint("checkpoint.before_report", rank=rank, epoch=epoch)
    commit_record = Path(directory, TRAIN_STATE).read_bytes() if rank == 0 else b""
    if rank == 0:
        Path(directory, TRAIN_STATE).unlink()  # uploaded last, by hand
    phase_one_done = False

    def upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        # Ray Train calls this once every rank agreed on ``dir_name`` (and again on a retried error)
        nonlocal phase_one_done
        storage = ray.train.get_context().get_storage()
        if rank != 0:
            persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
        if not phase_one_done:
            dist.barrier()  # phase 1 done: every other rank's files are in storage
            phase_one_done = True
        failpoint("checkpoint.upload", rank=rank, epoch=epoch)
        if rank == 0:
            persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
            failpoint("checkpoint.before_commit", rank=rank, epoch=epoch)
            with storage.storage_filesystem.open_output_stream(f"{persisted.path}/{TRAIN_STATE}") as f:
                f.write(commit_record)
        return persisted

    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(directory)), checkpoint_upload_fn=upload)
    if rank == 0:
        # return once the controller registered it (its next poll, at most ~2 s), so a failure
        # from here on, the next save's included, restarts from this checkpoint
        t0 = time.perf_counter()
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        logger.info("epoch %d checkpoint committed and registered (waited %.1fs)", epoch, time.perf_counter() - t0)


def checkpoint_to_resume(run: "RunDir", rank: int) -> Any:
    """Ray Train's checkpoint to resume from (a ``ray.train.Checkpoint``; None on a fresh run),
    after rank 0 removed the partial folders an interrupted save left (never the one restored).

    Call on every rank at the start of a worker group, before loading.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if rank == 0:
        remove_incomplete_checkpoints(run, keep=checkpoint.path if checkpoint else None)
    return checkpoint


def remove_incomplete_checkpoints(run: "RunDir", keep: Optional[str] = None) -> dict[str, str]:
    """Delete the run's ``checkpoint_*`` folders that an interrupted save left uncommitted.

    Call on rank 0 when a worker group starts (no save is in flight then). ``keep`` (the
    checkpoint being restored) is never touched. Logs each removal and records one
    ``{"event": "removed_incomplete_checkpoints"}`` line in metrics.jsonl.

    Returns:
        ``{folder name: why it was incomplete}``.
    """
    removed: dict[str, str] = {}
    for folder in run.checkpoint_folders():
        name = str(folder).rstrip("/").rsplit("/", 1)[-1]
        if keep is not None and name == Path(keep).name:
            continue
        reason = incomplete_reason(folder)
        if reason is None:
            continue
        try:
            storage.delete_dir(folder)
        except FileNotFoundError:
            pass
        removed[name] = reason
        logger.warning("removed incomplete checkpoint %s: %s", folder, reason)
    if removed:
        run.append_metrics({"event": "removed_incomplete_checkpoints", "removed": removed})
    return removed
