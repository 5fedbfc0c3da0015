"""Collective evaluation inside Ray Train workers: embed with the sharded model, rank, all-reduce.

DMP lookups are collectives, so every rank makes the same number of forward calls; the rows
to embed are split across ranks and all-gathered, and each rank scores its share of the users
before the metric sums are all-reduced.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from training.data.eval_sets import EvalUsers
from training.data.loader import to_kjt


@torch.no_grad()
def embed_rows(model, table: pa.Table, present: list[str], chunk: int, tower: str) -> torch.Tensor:
    """Embed every row of ``table`` with one tower, split across ranks; all ranks get all rows.

    Each rank embeds a contiguous slice (padded to the same number of equal-size forward
    calls, since DMP's lookups are collectives), then the slices are all-gathered.
    Returns ``[rows, D]``.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    n = table.num_rows
    per_rank = -(-n // world)
    steps = max(1, -(-per_rank // chunk))
    padded = steps * chunk
    idx = np.arange(rank * per_rank, rank * per_rank + padded).clip(max=n - 1)
    local = table.take(pa.array(idx))
    parts = []
    for s in range(steps):
        user, item = model(to_kjt(local.slice(s * chunk, chunk), present=present))
        parts.append(user if tower == "user" else item)
    mine = torch.cat(parts)  # [padded, D]
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine.contiguous())
    full = torch.cat([g[:per_rank] for g in gathered])
    return full[:n]


def evaluate(model, items: pa.Table, users: EvalUsers, ks: list[int], chunk: int) -> dict[str, float]:
    """Full-ranking metrics over the catalogue for ``users`` (collective; same result on all ranks)."""

    from training.retrieval.exact import ExactRetriever

    item_ids = items.column("item_id")
    item_emb = embed_rows(model, pa.table({"item_id": item_ids}), ["item_id"], chunk, tower="item")
    user_emb = embed_rows(model, users.histories, ["user_id", "history"], chunk, tower="user")
    retriever = ExactRetriever(torch.from_numpy(item_ids.to_numpy().astype(np.int64)), item_emb)
    return evaluate_retriever(retriever, user_emb, users, ks)


def evaluate_retriever(retriever, user_emb: torch.Tensor, users: EvalUsers, ks: list[int]) -> dict[str, float]:
    """Metrics of any retriever on ``users`` (collective): each rank scores its share of the
    users, the metric sums are all-reduced, so every rank gets the same result.

    Args:
        retriever: anything with the retriever protocol's ``search``.
        user_emb: ``[U, ...]`` what the retriever takes per user, for all users (rows of
            ``users``, in order).
    """
    import torch.distributed as dist

    from training.eval.harness import EvalSet, evaluate_sums, finalize

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = np.array_split(np.arange(len(users.targets)), world)[rank]
    data = EvalSet(
        user_ids=torch.from_numpy(users.histories.column("user_id").to_numpy()[mine].astype(np.int64)),
        user_emb=user_emb[torch.from_numpy(mine)],
        targets=torch.from_numpy(users.targets[mine].astype(np.int64)),
        exclude=[torch.from_numpy(users.seen[i].astype(np.int64)) for i in mine],
    )
    sums = evaluate_sums(retriever, data, ks)
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(vec)
    return finalize(dict(zip(keys, vec.tolist())))
