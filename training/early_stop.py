"""Early stopping on valid: stop after ``train.patience`` epochs without a better valid
Recall@10 and serve the best epoch's weights, not the last's.

Why keep a copy of the best weights rather than point at Ray Train's checkpoint of that epoch:
the run keeps only its two newest checkpoints (they are for resuming after a failure), so the
best epoch's is often gone by the time training stops. The copy is a DCP checkpoint of the model
(``training.checkpoint.save_checkpoint``, optimizer state left out), written by every rank into
one node-local folder that rank 0 creates; all workers must share that node (a multi-node run
with ``train.patience`` fails at its first epoch, saying so). A run resumed after a failure
tracks the best epoch among those it trains after resuming.

Example (inside a worker, every rank, after each epoch's collective evaluation)::

    best = BestEpoch(cfg.train.patience)
    for epoch in ...:
        ...
        if best.update(epoch, metrics):
            best.keep(model)
        if best.should_stop:
            break
    best.restore(model)   # the best epoch's weights (nothing happens without patience)
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from training.checkpoint import load_checkpoint, save_checkpoint

METRIC = "valid/recall@10"


class BestEpoch:
    """Tracks the best epoch by ``valid/recall@10`` and how many epochs since it improved.

    Args:
        patience: epochs in a row without improvement before :attr:`should_stop`; None never
            stops and :meth:`keep` / :meth:`restore` do nothing (the last epoch is served).
    """

    def __init__(self, patience: Optional[int]) -> None:
        self.patience = patience
        self.best_epoch: Optional[int] = None
        self.best_value = float("-inf")
        self.bad_epochs = 0
        self._directory: Optional[Path] = None

    def update(self, epoch: int, metrics: dict[str, Any]) -> bool:
        """Record an epoch's valid metrics; True when it is the best so far (ties keep the earlier)."""
        value = float(metrics[METRIC])
        if value > self.best_value:
            self.best_epoch, self.best_value, self.bad_epochs = epoch, value, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def keep(self, model: torch.nn.Module) -> None:
        """Copy the model's weights as the best (collective: call on every rank)."""
        if self.patience is None:
            return
        if self._directory is None:
            self._directory = _shared_tempdir()
        save_checkpoint(model, None, {"epoch": self.best_epoch}, self._directory)

    def restore(self, model: torch.nn.Module) -> Optional[int]:
        """Load the kept weights into ``model`` (collective); returns their epoch, None if none kept."""
        import torch.distributed as dist

        if self._directory is None:
            return None
        state = load_checkpoint(model, None, self._directory)
        dist.barrier()  # every rank read the folder before rank 0 removes it
        if dist.get_rank() == 0:
            shutil.rmtree(self._directory, ignore_errors=True)
        self._directory = None
        return int(state["epoch"])


def _shared_tempdir() -> Path:
    """A folder rank 0 creates, its path broadcast to every rank (collective); all ranks must
    run on one node, since each rank writes its own shards into it."""
    import torch.distributed as dist

    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    if len(set(hosts)) > 1:
        raise RuntimeError(f"train.patience keeps the best weights in a node-local folder; workers span hosts {sorted(set(hosts))}")
    path = [tempfile.mkdtemp(prefix="rayrec-best-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return Path(path[0])


def served_valid(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The valid metrics (``recall@10``, ...) of the epoch a run serves, from its metrics.jsonl
    records: the best epoch's when it stopped on valid (its ``best_epoch`` event), else the last
    epoch's. What a config is chosen on (``rayrec tune``, ``benchmarks/bench_quality.py``)."""
    records = list(records)
    epochs = [m for m in records if "valid/recall@10" in m and "event" not in m]
    served = [m["epoch"] for m in records if m.get("event") == "best_epoch"]
    if served:
        epochs = [m for m in epochs if m["epoch"] == served[-1]] or epochs
    return {k.split("/", 1)[1]: v for k, v in epochs[-1].items() if k.startswith("valid/")} if epochs else {}
