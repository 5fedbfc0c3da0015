"""The worker's side of ``rayrec train --continue``, shared by every kind that continues.

A continued job is its kind's recipe (``continue_retrieval`` for the two-tower, the kind's own
job loop for MFLI and HSNN) with three differences, all here so they are written once:

* where it starts (:meth:`FeedbackEpochs.restore`): this version's own committed checkpoint when a restart left one (its
  watermark is this job's), else the parent run's last one;
* what it records: which feedback events (``seq``) each epoch trained, gathered from every
  rank, as a ``feedback_trained`` metrics record an audit counts (:meth:`note`,
  :meth:`end_epoch`);
* what commits: the watermark past the new events, in the checkpoint's ``train_state.json``
  with the model (:meth:`train_state`), so a checkpoint has both or neither.

The driver (``training.jobs.continue_retrieval.continue_run``) puts ``base_checkpoint`` and
``watermark`` in the loop config; a worker without them is a plain training job
(:meth:`FeedbackEpochs.of` returns None).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import torch

from embeddings.tables import identities_digest
from training import storage
from training.checkpoint import checkpoint_to_resume, load_checkpoint
from training.runs import RunDir


class FeedbackEpochs:
    """One continued job's restore, trained-event record and commit state on one worker.

    Args:
        config: the train loop's config (``base_checkpoint``: the parent's committed checkpoint,
            a path or URI; ``watermark``: the watermark this job commits).
        rank / world: this worker's rank and the group's size.
    """

    def __init__(self, config: dict[str, Any], rank: int, world: int) -> None:
        self.base = str(config["base_checkpoint"])
        self.watermark = dict(config["watermark"])
        self.rank, self.world = rank, world
        self.attempt = _attempt_id(rank)
        self._trained: list[np.ndarray] = []

    @classmethod
    def of(cls, config: dict[str, Any], rank: int, world: int) -> Optional[FeedbackEpochs]:
        """The continuation of this loop, or None for a plain training job (collective when not None)."""
        return cls(config, rank, world) if "base_checkpoint" in config else None

    def restore(self, run: RunDir, model: torch.nn.Module, optimizer: Any,
                also: Optional[Callable[[Path], Any]] = None) -> tuple[int, Any]:
        """Load this version's own committed checkpoint, else the parent's; returns the epoch to
        start from (0 from the parent) and what ``also`` read from the checkpoint folder (a
        job's own files there, e.g. HSNN's tree; None without it). Raises when the MPZCH
        identities restored differ from the ones saved (never train on from a table that
        differs from the saved one)."""
        own = checkpoint_to_resume(run, self.rank)
        source = own if own is not None else _checkpoint_at(self.base)
        with source.as_directory() as directory:
            state = load_checkpoint(model, optimizer, directory)
            extra = also(Path(directory)) if also is not None else None
        saved = state.get("identities")
        if saved is not None and identities_digest(model) != saved:
            raise RuntimeError(f"MPZCH identities after restoring {source.path} differ from its train state")
        start = state["epoch"] + 1 if own is not None else 0
        if self.rank == 0:
            run.append_metrics({"event": "continue_started", "attempt": self.attempt, "from": source.path,
                                "epoch": start, "world_size": self.world})
        return start, extra

    def note(self, batch: pa.Table) -> None:
        """Record the events of a batch this rank trained (``seq`` ≥ 0; padding is -1)."""
        seq = np.array(batch.column("seq"), dtype=np.int64)
        self._trained.append(seq[seq >= 0])

    def trained(self) -> int:
        """Events this rank has trained so far this epoch (for progress)."""
        return int(sum(len(s) for s in self._trained))

    def end_epoch(self, run: RunDir, epoch: int) -> int:
        """Gather which events the epoch trained on every rank and log them (rank 0); returns
        how many. Collective; starts the next epoch's record."""
        import torch.distributed as dist

        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, np.concatenate(self._trained) if self._trained else np.zeros(0, np.int64))
        self._trained = []
        seqs = np.sort(np.concatenate(everyone))
        if self.rank == 0:
            run.append_metrics({"event": "feedback_trained", "attempt": self.attempt, "epoch": epoch,
                                "events": int(len(seqs)), "seq_ranges": _ranges(seqs)})
        return int(len(seqs))

    def train_state(self) -> dict[str, Any]:
        """What the checkpoint's commit record carries besides the epoch: the watermark."""
        return {"watermark": self.watermark, "attempt": self.attempt, "parent_checkpoint": self.base}


def batch_weight(batch: pa.Table, device: torch.device) -> Optional[torch.Tensor]:
    """``[b]`` float32 example weights (0 = padding, ``training.data.feedback_examples``), or None
    for a batch without a ``weight`` column (a plain training job's)."""
    if "weight" not in batch.column_names:
        return None
    return torch.from_numpy(np.array(batch.column("weight"), dtype=np.float32)).to(device)


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
