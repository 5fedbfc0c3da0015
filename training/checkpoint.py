"""Sharded checkpoints: save on N ranks, load on M (TorchRec re-plans, DCP reshards).

A checkpoint folder holds ``torch.distributed.checkpoint`` shards of ``{"model", "optim"}``
(the tables' rows, MPZCH identities and metadata, the fused optimizer's state, the dense
weights and AdamW state) and ``train_state.json`` (epoch). Ray Train merges every rank's
files into one folder when each reports its own temp folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

TRAIN_STATE = "train_state.json"


def save_checkpoint(model: torch.nn.Module, optimizer: Any, state: dict[str, Any], directory: str | Path) -> None:
    """Every rank writes its shards; rank 0 writes the train state (call on all ranks)."""
    dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=str(directory))
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(directory, TRAIN_STATE).write_text(json.dumps(state))


def load_checkpoint(model: torch.nn.Module, optimizer: Any | None, directory: str | Path) -> dict[str, Any]:
    """Load a checkpoint into this model (any world size); returns the train state.

    ``optimizer`` None loads the model only (inference).
    """
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(directory))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    return json.loads(Path(directory, TRAIN_STATE).read_text())


def is_complete(directory: str | Path) -> bool:
    """A checkpoint folder is usable when DCP's metadata and the train state are both there."""
    d = Path(directory)
    return (d / ".metadata").is_file() and (d / TRAIN_STATE).is_file()
