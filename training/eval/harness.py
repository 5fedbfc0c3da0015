"""The one evaluation harness: full ranking over the catalogue, seen items masked.

Every retriever (exact two-tower, later MFLI, HSNN, FAISS) is scored by calling the retriever
protocol (``training.retrieval.protocol``) on user embeddings and comparing its top-K with the
held-out item. Users are processed in chunks so memory stays ``O(chunk × catalogue)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from training.eval.metrics import metric_sums


@dataclass
class EvalSet:
    """Users to evaluate: their embeddings, held-out item and items to mask.

    Args:
        user_ids: ``[U]`` raw ids.
        user_emb: ``[U, D]``.
        targets: ``[U]`` held-out raw item id.
        exclude: per user, raw item ids already seen (masked from the ranking).
    """

    user_ids: torch.Tensor
    user_emb: torch.Tensor
    targets: torch.Tensor
    exclude: list[torch.Tensor]

    def rows(self, pick: np.ndarray) -> EvalSet:
        """The users at positions ``pick`` (ascending ints), in that order."""
        idx = torch.from_numpy(pick)
        return EvalSet(self.user_ids[idx], self.user_emb[idx], self.targets[idx], [self.exclude[i] for i in pick])

    def sample(self, n: int, seed: int = 0) -> EvalSet:
        """``n`` users drawn without replacement (all if fewer), kept in their order."""
        pick = np.random.default_rng(seed).choice(len(self.user_ids), size=min(n, len(self.user_ids)), replace=False)
        return self.rows(np.sort(pick))


def evaluate_sums(retriever, data: EvalSet, ks: list[int], chunk: int = 256) -> dict[str, float]:
    """Metric sums over ``data`` (add them across shards, then divide by ``users``).

    Also sums ``items_scored`` and the wall time spent in ``search``.
    """
    k = max(ks)
    totals: dict[str, float] = {}
    search_s = 0.0
    for start in range(0, len(data.user_ids), chunk):
        end = start + chunk
        t0 = time.perf_counter()
        result = retriever.search(data.user_emb[start:end], k, exclude=data.exclude[start:end])
        search_s += time.perf_counter() - t0
        sums = metric_sums(result.item_ids, data.targets[start:end], ks)
        sums["items_scored"] = float(result.stats.get("items_scored", 0))
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + value
    totals["search_s"] = search_s
    return totals


def finalize(sums: dict[str, float]) -> dict[str, float]:
    """Turn summed metrics into means per user (``items_scored`` and time per query too)."""
    users = max(sums.get("users", 0.0), 1.0)
    out = {name: value / users for name, value in sums.items() if name not in ("users", "search_s")}
    out["users"] = sums.get("users", 0.0)
    out["ms_per_query"] = 1000.0 * sums.get("search_s", 0.0) / users
    return out
