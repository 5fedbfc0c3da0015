"""The ranker's training objective: per-task losses, MBD, the FM's own heads, imputation, FM dropout.

:func:`ranking_loss` combines, with the config's weights, the losses of one forward pass
(:class:`training.models.ranker.RankerOutput`) against labels and masks ``[B, T]``; a masked
label (a task the example does not carry) adds nothing. :func:`fm_keep_mask` is the training-time
FM dropout that teaches the ranker every cache hit rate.

Notation: B examples, T tasks, D_fm FM width.

Example::

    out = model(kjt, dense, cohorts, fm_keep=fm_keep_mask(B, cfg.foundation.dropout))
    parts = ranking_loss(model, out, labels, masks, cfg)   # {"tasks", "mbd", "fm", ..., "total"}
    parts["total"].backward()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.models.ranker import RankerOutput, RankingModel
from training.models.ranker_config import RankerModelConfig, TaskConfig


def task_loss(logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, tasks: list[TaskConfig]) -> torch.Tensor:
    """Weighted sum over tasks of the masked mean loss; ``logits, labels, masks`` ``[B, T]``."""
    total = torch.zeros((), device=logits.device)
    for t, task in enumerate(tasks):
        z, y, m = logits[:, t], labels[:, t], masks[:, t]
        if task.loss == "bce":
            per_row = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        else:
            y = torch.log1p(y.clamp(min=0)) if task.log_target else y
            fn = F.huber_loss if task.loss == "huber" else F.mse_loss
            per_row = fn(z, y, reduction="none")
        total = total + task.weight * (per_row * m).sum() / m.sum().clamp(min=1)
    return total


def ranking_loss(model: RankingModel, out: RankerOutput, labels: torch.Tensor, masks: torch.Tensor, cfg: RankerModelConfig) -> dict[str, torch.Tensor]:
    """The ranker's loss parts: ``tasks``, ``mbd``, ``fm`` and their weighted ``total``."""
    logits = torch.stack([out.logits[t.name] for t in cfg.tasks], 1)  # [B, T]
    parts = {"tasks": task_loss(logits, labels, masks, cfg.tasks)}
    total = parts["tasks"]
    if model.mbd is not None:
        index = {t.name: i for i, t in enumerate(cfg.tasks)}
        stats = {k: (out.mbd_mean[k], out.mbd_var[k]) for k in out.mbd_mean}
        parts["mbd"] = model.mbd.loss(
            stats, {k: labels[:, index[k]] for k in stats}, {k: masks[:, index[k]] for k in stats}
        )
        total = total + cfg.mbd.weight * parts["mbd"]
    if out.fm_logits is not None:
        parts["fm"] = task_loss(out.fm_logits, labels, masks, cfg.tasks)
        total = total + cfg.foundation.weight * parts["fm"]
    if out.fm_imputed is not None and out.fm_embedding is not None:
        parts["fm_impute"] = imputation_loss(out.fm_imputed, out.fm_embedding)
        total = total + cfg.foundation.impute_weight * parts["fm_impute"]
    parts["total"] = total
    return parts


def imputation_loss(imputed: torch.Tensor, fm: torch.Tensor) -> torch.Tensor:
    """Distillation of the FM embedding into the imputer: MSE over the FM's mean square, ``[B,
    D_fm]`` each (1 means "no better than predicting zeros"). Scale-free, so one weight suits any
    FM width or norm, and bounded while the teacher is young (over its *variance* it blew up
    whenever the FM's outputs were nearly constant). The FM gets no gradient from it."""
    target = fm.detach()
    return F.mse_loss(imputed, target) / target.pow(2).mean().clamp(min=1e-6)


def fm_keep_mask(batch_size: int, dropout: float | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-time FM dropout: ``[B]`` bool, True where the row keeps its FM embedding."""
    rate = float(torch.rand((), generator=generator)) if dropout == "uniform" else float(dropout)
    return torch.rand(batch_size, generator=generator) >= rate
