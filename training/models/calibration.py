"""Per-path Platt calibration of the ranker's binary tasks.

Why: every row is scored by one of two paths, with the foundation model's embedding or with the
learned *missing* embedding, and a live cache hit rate mixes both within one candidate list.
The two paths come out of training on different probability scales, and the training examples'
label rates are not the serving lists' (ml-100k samples 2 unrated items per rating; evaluation
lists hold 20). So after training, each binary task gets an affine map of its logit per path,
``a[t, path] · logit + b[t, path]``, fitted by logistic regression on the validation lists
(Platt scaling). Predicted probabilities then mean the same thing whichever path scored a row:
a candidate with its FM and one without compare fairly, and ``calibration`` (predicted/actual)
is about 1. The map is monotone (``a > 0``), so each path's own ordering and AUC are unchanged.

What stays uncalibrated: training losses read the raw logits, and MBD z-scores standardise the
raw prediction (MBD's cohort statistics live in the training labels' space).

Shapes: B rows, T tasks; paths: 0 = FM missing, 1 = FM present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# A path needs this many labelled rows with both classes before it gets its own map.
MIN_ROWS = 50
# Bounds of the fitted slope a (see fit_platt).
MIN_SCALE, MAX_SCALE = 0.05, 20.0


class PathCalibration(nn.Module):
    """``logits [B, T]``, ``present [B]`` bool → calibrated logits ``[B, T]``; identity until fitted.

    The maps are buffers: they travel with the state_dict (checkpoint, serving artifact).
    """

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(tasks, 2))  # [T, 2]
        self.register_buffer("bias", torch.zeros(tasks, 2))  # [T, 2]

    def forward(self, logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        path = present.long()  # [B]
        return logits * self.scale[:, path].T + self.bias[:, path].T

    def set_map(self, task: int, path: int, scale: float, bias: float) -> None:
        self.scale[task, path] = scale
        self.bias[task, path] = bias


def fit_platt(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(a, b) minimising BCE of ``a · logits + b`` against 0/1 ``labels`` (both ``[N]``).

    Identity (1, 0) when there are too few rows or one class only. ``a`` stays in
    [``MIN_SCALE``, ``MAX_SCALE``]: positive so the map never reverses an order, and away from 0
    so that, when the validation lists say the logits carry little signal, float32
    probabilities still tell rows apart instead of collapsing onto the base rate.
    """
    x, y = logits.detach().double(), labels.detach().double()
    if len(x) < MIN_ROWS or y.min() == y.max():
        return 1.0, 0.0
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)  # a = exp(log_a) > 0
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    _minimise([log_a, b], lambda: F.binary_cross_entropy_with_logits(log_a.exp() * x + b, y))
    a = float(log_a.exp())
    if MIN_SCALE <= a <= MAX_SCALE:
        return a, float(b)
    a = min(max(a, MIN_SCALE), MAX_SCALE)  # clamp the slope, refit the offset for it
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    _minimise([b], lambda: F.binary_cross_entropy_with_logits(a * x + b, y))
    return a, float(b)


def _minimise(params: list[torch.Tensor], loss_fn) -> None:
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
