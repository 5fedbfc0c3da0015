"""Ranking metrics for leave-one-out evaluation (one held-out item per user).

With a single relevant item, Recall@K equals HitRate@K; NDCG@K is 1/log2(rank + 2) when the
item is ranked at 0-based ``rank < K``; MRR@K is 1/(rank + 1). Computed from the top-K ids a
retriever returned, so every retriever is scored the same way.
"""

from __future__ import annotations

import torch


def target_ranks(topk_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each user's target in its top-K list, or K when absent.

    Args:
        topk_ids: ``[U, K]`` int64 raw ids (-1 padding allowed).
        targets: ``[U]`` int64 raw ids.
    Returns:
        ``[U]`` int64.
    """
    k = topk_ids.shape[1]
    hit = topk_ids == targets.unsqueeze(1)  # [U, K]
    first = torch.where(hit.any(dim=1), hit.to(torch.int8).argmax(dim=1), torch.full_like(targets, k))
    return first


def ranking_metrics(topk_ids: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Mean Recall/NDCG/MRR at each K over users (``topk_ids`` must have >= max(ks) columns)."""
    if topk_ids.shape[1] < max(ks):
        raise ValueError(f"need top-{max(ks)} lists, got {topk_ids.shape[1]}")
    sums = metric_sums(topk_ids, targets, ks)
    n = max(int(targets.numel()), 1)
    return {name: value / n for name, value in sums.items() if name != "users"}


def metric_sums(topk_ids: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """Per-metric sums (and the user count), so shards can be added across ranks."""
    ranks = target_ranks(topk_ids, targets).to(torch.float64)
    out: dict[str, float] = {"users": float(targets.numel())}
    for k in ks:
        within = ranks < k
        out[f"recall@{k}"] = float(within.sum())
        out[f"ndcg@{k}"] = float((within / torch.log2(ranks + 2)).sum())
        out[f"mrr@{k}"] = float((within / (ranks + 1)).sum())
    return out
