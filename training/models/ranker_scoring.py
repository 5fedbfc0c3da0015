"""Score a whole table of ranking examples with the ranker: what evaluation and calibration read.

Training evaluates on example tables (:mod:`training.data.ranking_examples`: ids, history,
dense, cohorts, labels, masks per row), not on (user, candidates) requests; this turns such a
table into forward passes of ``batch_size`` rows and collects every output as ``[N]`` arrays.
Under DMP it is collective: every rank must score the same table. Serving scores requests
through :class:`training.models.ranker_artifact.RankerScorer` instead.

Notation: N example rows; ``shape`` = (F dense features, C cohort features, T tasks).

Example::

    scores = score_table(model, data.test, (F, C, T), batch_size=512, fm_hit_rate=1.0)
    scores["pred/like"], scores["mbd_mean/rating"]   # [N] each
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from training.data.loader import FEATURES, to_kjt
from training.data.ranking_examples import batch_arrays


def example_batches(table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    """Fixed-size slices of an example table (the last may be short)."""
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)


def model_inputs(
    batch: pa.Table, num_dense: int, num_cohorts: int, num_tasks: int, device: torch.device
) -> dict[str, KeyedJaggedTensor | torch.Tensor]:
    """Arrow example batch → the forward's tensors plus labels/masks ``[B, T]``."""
    arrays = batch_arrays(batch, num_dense, num_cohorts, num_tasks)
    return {
        "kjt": to_kjt(batch.select(list(FEATURES)), FEATURES).to(device),
        **{k: torch.from_numpy(v).to(device) for k, v in arrays.items()},
    }


@torch.no_grad()
def score_table(
    model: nn.Module, table: pa.Table, shape: tuple[int, int, int], batch_size: int, fm_hit_rate: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Predictions for every row of an example table (eval mode; collective under DMP).

    ``fm_hit_rate`` is the share of rows whose FM embedding is available (computed in the same
    pass, i.e. the FM "cache" holds it); 0 is no FM, 1 the oracle. Returns ``pred/<task>``,
    ``raw_pred/<task>`` (before calibration), ``mbd_mean/<signal>``, ``mbd_var/<signal>``
    arrays ``[N]``.
    """
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[np.ndarray]] = {}
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    for batch in example_batches(table, batch_size):
        inputs = model_inputs(batch, *shape, device)
        keep = torch.rand(batch.num_rows, generator=generator) < fm_hit_rate
        out = model(inputs["kjt"], inputs["dense"], inputs["cohorts"], fm_keep=keep.to(device))
        for prefix, values in (("pred", out.predictions), ("raw_pred", out.raw_predictions),
                               ("mbd_mean", out.mbd_mean), ("mbd_var", out.mbd_var)):  # fmt: skip
            for name, v in values.items():
                parts.setdefault(f"{prefix}/{name}", []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}
