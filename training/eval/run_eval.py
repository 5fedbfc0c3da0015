"""``rayrec eval``: score a finished run's serving index on its test split.

Reads ``runs/<id>/index/`` (user embeddings built from train+valid history, item embeddings,
seen items) and the dataset's ``interactions/test.parquet``; every retriever goes through the
one harness (``training.eval.harness``). FAISS IVF-Flat and HNSW (``training.retrieval.faiss_retriever``) are baselines over the same
embeddings (faiss-cpu is a dev dependency, never a serving one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from training.eval.harness import EvalSet, evaluate_sums, finalize
from training.retrieval.exact import ExactRetriever, read_embedding_table
from training.retrieval.faiss_retriever import FaissConfig, FaissRetriever
from training.retrieval.protocol import SearchResult
from training.runs import RunDir
from training.storage import local_path


class PopularityRetriever:
    """The most interacted-with items first, the same list for everyone (the floor to beat)."""

    def __init__(self, item_ids: torch.Tensor, counts: torch.Tensor) -> None:
        self.exact = ExactRetriever(item_ids, counts.to(torch.float32).unsqueeze(1))

    def search(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        return self.exact.search(torch.ones(user_emb.shape[0], 1), k, exclude=exclude)


def load_test_set(run: RunDir) -> EvalSet:
    """Test users of the run's dataset with their exported embeddings and seen items."""
    info = json.loads((run.index_dir / "index.json").read_text())
    test = pq.read_table(local_path(info["dataset"]) / "interactions" / "test.parquet", columns=["user_id", "item_id"]).sort_by("user_id")
    user_ids, user_emb = read_embedding_table(run.index_dir / "users.parquet", "user_id")
    order = torch.argsort(user_ids)
    user_ids, user_emb = user_ids[order], user_emb[order]
    target_users = torch.from_numpy(test.column("user_id").to_numpy().astype(np.int64))
    pos = torch.searchsorted(user_ids, target_users).clamp(max=len(user_ids) - 1)
    known = user_ids[pos] == target_users
    seen = pq.read_table(run.index_dir / "seen.parquet").sort_by("user_id")
    su = seen.column("user_id").to_numpy()
    si = seen.column("item_id").to_numpy().astype(np.int64)
    users = target_users[known].numpy()
    lo, hi = np.searchsorted(su, users, "left"), np.searchsorted(su, users, "right")
    return EvalSet(
        user_ids=target_users[known],
        user_emb=user_emb[pos[known]],
        targets=torch.from_numpy(test.column("item_id").to_numpy().astype(np.int64))[known],
        exclude=[torch.from_numpy(si[a:b]) for a, b in zip(lo, hi)],
    )


def evaluate_run(run_dir: str | Path, ks: list[int], faiss: bool = False) -> list[dict]:
    """One row of metrics per retriever over the run's test users (a run folder or URI)."""
    run = RunDir.open(run_dir).pull()
    if not (run.index_dir / "index.json").exists():
        raise FileNotFoundError(f"{run.index_dir} has no index.json: the run has not finished training")
    data = load_test_set(run)
    item_ids, item_emb = read_embedding_table(run.index_dir / "items.parquet", "item_id")
    popularity = pq.read_table(run.index_dir / "popularity.parquet")
    retrievers = {
        "two_tower_exact": ExactRetriever(item_ids, item_emb),
        "popularity": PopularityRetriever(
            torch.from_numpy(popularity.column("item_id").to_numpy().astype(np.int64)),
            torch.from_numpy(popularity.column("count").to_numpy().astype(np.float64)),
        ),
    }
    if faiss:
        retrievers["faiss_ivf"] = FaissRetriever(item_ids, item_emb, FaissConfig("ivf"))
        retrievers["faiss_hnsw"] = FaissRetriever(item_ids, item_emb, FaissConfig("hnsw"))
    torch.set_num_threads(1)  # single-thread cost per query, comparable across retrievers
    rows = []
    for name, retriever in retrievers.items():
        metrics = finalize(evaluate_sums(retriever, data, ks, chunk=1 if name.startswith("faiss") else 256))
        rows.append({"system": name, **metrics})
    info = json.loads((run.index_dir / "index.json").read_text())
    if info.get("model") == "mfli":  # the learned index's own lookup, plus its exact ceiling
        from training.eval.retrieval_bench import evaluate_mfli_run

        rows = evaluate_mfli_run(run.path, ks) + [r for r in rows if r["system"] != "two_tower_exact"]
    if info.get("model") == "hsnn":  # beam search and exhaustive MoNN scoring over the learned tree
        from training.index.hsnn_index import hsnn_retrievers, with_user_packs

        rows = [{**r, "system": "hsnn_dot_exact"} if r["system"] == "two_tower_exact" else r for r in rows]
        packed = with_user_packs(run.index_dir, data)
        for name, retriever in hsnn_retrievers(run.index_dir).items():
            rows.append({"system": name, **finalize(evaluate_sums(retriever, packed, ks))})
    return rows


def format_table(rows: list[dict], ks: list[int]) -> str:
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{ks[0]}", "items_scored", "ms_per_query"]
    lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['system']} | " + " | ".join(f"{row.get(c, float('nan')):.4g}" for c in cols) + " |")
    return "\n".join(lines)
