"""Retrieval figures beyond recall: MFLI lookup, fidelity to exact, cold items, popularity, latency.

``rayrec eval`` (``training.eval.run_eval``) scores a run's exported embeddings with exact
search and FAISS; this module adds what issue 4 asks of every retriever, over the same test
users (leave-one-out, full ranking, seen items masked):

- :func:`score_retriever`: Recall@K / NDCG@K, items scored per query, Recall@100 against a
  reference top-100 (the model's own exact search), cold-item recall (targets with fewer than
  ``COLD_MAX`` training interactions) and the share of top-10 slots taken by the 1% most
  popular items.
- :func:`latency`: single-thread search time per call at batch 1 and batch 256 (torch and
  FAISS both held to one thread).
- :func:`mfli_retriever`: the MFLI index of a run folder (``index/mfli/``).
- :func:`add_cold_items`: the real-time path: items removed from the index and re-added with
  the vectors a brand-new item with their content gets (:func:`content_embedder`: the run's
  exported content encoder, every facet), as if they had arrived after training.

Example::

    data = load_test_set(RunDir(path))
    row = score_retriever(mfli_retriever(path), data, popularity, ks=[10, 50, 100])
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from training.eval.harness import EvalSet
from training.eval.metrics import ranking_metrics
from training.index.mfli_index import MFLIIndex
from training.runs import RunDir

COLD_MAX = 5
"""An item with fewer training (train + valid) interactions than this is "cold"."""


@dataclass
class Popularity:
    """Training interaction counts, to pick cold targets and the most popular items.

    Args:
        item_ids: ``[N]`` int64 sorted; counts: ``[N]`` int64.
    """

    item_ids: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_run(cls, run: RunDir) -> Popularity:
        """From ``index/popularity.parquet`` (train + valid counts)."""
        table = pq.read_table(run.index_dir / "popularity.parquet").sort_by("item_id")
        return cls(
            torch.from_numpy(table.column("item_id").to_numpy().astype(np.int64)),
            torch.from_numpy(table.column("count").to_numpy().astype(np.int64)),
        )

    def count(self, ids: torch.Tensor) -> torch.Tensor:
        """Counts of ``ids`` (any shape; 0 for unknown ids)."""
        pos = torch.searchsorted(self.item_ids, ids).clamp(max=len(self.item_ids) - 1)
        return torch.where(self.item_ids[pos] == ids, self.counts[pos], 0)

    def top_share_ids(self, share: float = 0.01, catalogue: int | None = None) -> torch.Tensor:
        """Ids of the ``share`` most popular items of a ``catalogue``-item catalogue."""
        n = max(1, round(share * (catalogue or len(self.item_ids))))
        return self.item_ids[torch.argsort(self.counts, descending=True, stable=True)[:n]]


def top_k_all(retriever, data: EvalSet, k: int, chunk: int = 256) -> tuple[torch.Tensor, float]:
    """Top-k ids ``[U, k]`` of every test user and the mean items scored per query."""
    ids, scored = [], 0.0
    for start in range(0, len(data.user_ids), chunk):
        end = start + chunk
        result = retriever.search(data.user_emb[start:end], k, exclude=data.exclude[start:end])
        ids.append(result.item_ids)
        scored += float(result.stats.get("items_scored", 0))
    return torch.cat(ids), scored / max(len(data.user_ids), 1)


def overlap_at(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean share of each row of ``reference`` ``[U, k]`` found in ``got`` ``[U, k']``."""
    hits = (got.unsqueeze(2) == reference.unsqueeze(1)) & (reference.unsqueeze(1) >= 0)  # [U, k', k]
    valid = (reference >= 0).sum(1).clamp(min=1)
    return float((hits.any(1).sum(1) / valid).mean())


def score_retriever(
    retriever,
    data: EvalSet,
    popularity: Popularity,
    ks: list[int],
    reference: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Quality figures of one retriever over ``data``; also returns its top-``max(ks)`` ids.

    ``reference``: the model's own exact top-``max(ks)`` (for ``topK_overlap_vs_own_exact``).
    """
    k = max(ks)
    top, scored = top_k_all(retriever, data, k)
    metrics = ranking_metrics(top, data.targets, ks)
    out = {name: value for name, value in metrics.items() if not name.startswith("mrr")}
    out["items_scored"] = scored
    cold = popularity.count(data.targets) < COLD_MAX
    out["cold_users"] = float(cold.sum())
    if bool(cold.any()):
        cold_metrics = ranking_metrics(top[cold], data.targets[cold], ks)
        out.update({f"cold_{name}": value for name, value in cold_metrics.items() if name.startswith("recall")})
    popular = popularity.top_share_ids(0.01)
    top10 = top[:, :10]
    out["top1pct_share@10"] = float(torch.isin(top10, popular).sum() / (top10 >= 0).sum().clamp(min=1))
    if reference is not None:
        out[f"top{k}_overlap_vs_own_exact"] = overlap_at(top, reference)
    return out, top


def latency(retriever, data: EvalSet, batch: int, calls: int, k: int = 100) -> dict[str, float]:
    """Wall time per ``search`` call on one thread: p50 / p99 ms and ms per query.

    Runs ``calls`` calls of ``batch`` consecutive users (wrapping around), after one warm-up.
    """
    with _one_thread():
        n = len(data.user_ids)
        times = []
        for call in range(calls + 1):
            idx = [(call * batch + i) % n for i in range(batch)]
            users = data.user_emb[idx]
            exclude = [data.exclude[i] for i in idx]
            t0 = time.perf_counter()
            retriever.search(users, k, exclude=exclude)
            if call:  # the first call warms caches up
                times.append(1000.0 * (time.perf_counter() - t0))
    arr = np.asarray(times)
    return {
        "latency_ms_p50": float(np.percentile(arr, 50)),
        "latency_ms_p99": float(np.percentile(arr, 99)),
        "ms_per_query": float(arr.mean() / batch),
    }


def interleaved_latency(
    points: list[tuple[Any, Callable[[], Any], EvalSet]], calls: int, rounds: int = 10, k: int = 100, batch: int = 1
) -> dict[Any, dict[str, float]]:
    """Latency per ``search`` call of ``batch`` users for several (retriever, knob) points,
    measured in interleaved rounds.

    Each round times ``calls // rounds`` calls of every point in turn (order rotated per round),
    so a shared machine's slow minutes fall on every point alike instead of on whichever point
    happened to run then: recall-at-equal-latency comparisons read across points. ``points``
    holds (key, setup, data): ``setup()`` sets the knob and returns the retriever. Returns key ->
    p50 / p99 ms over all of the point's calls (wall clock), and ``cpu_ms_p50``: the p50 of the
    CPU time the calling thread spent in the call. Why both: everything runs on one thread, so the
    CPU time is the call's cost with the time other processes held the core taken out; on a
    machine shared with dozens of runnable processes, a call longer than a scheduler slice (batch
    256) is preempted a varying number of times and its wall time says more about the load.
    """
    times: dict[Any, list[float]] = {key: [] for key, _, _ in points}
    cpu: dict[Any, list[float]] = {key: [] for key, _, _ in points}
    cursor = dict.fromkeys(times, 0)
    per_round = max(1, calls // rounds)
    with _one_thread():
        for r in range(rounds):
            for key, setup, data in points[r % len(points):] + points[: r % len(points)]:
                retriever = setup()
                n = len(data.user_ids)
                warm = 1 if batch == 1 else 0  # a batch of users warms its own caches up
                for call in range(per_round + warm):
                    idx = [(cursor[key] + j) % n for j in range(batch)]
                    users, exclude = data.user_emb[idx], [data.exclude[j] for j in idx]
                    c0, t0 = time.thread_time(), time.perf_counter()
                    retriever.search(users, k, exclude=exclude)
                    if call >= warm:  # the first one-user call after a switch warms caches up
                        times[key].append(1000.0 * (time.perf_counter() - t0))
                        cpu[key].append(1000.0 * (time.thread_time() - c0))
                        cursor[key] += batch
    return {key: {"latency_ms_p50": float(np.percentile(t, 50)), "latency_ms_p99": float(np.percentile(t, 99)),
                  "cpu_ms_p50": float(np.percentile(cpu[key], 50))} for key, t in times.items()}


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch and FAISS on one thread (FAISS runs OpenMP on every core unless told otherwise),
    restored afterwards: latency is reported per thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss_before = _faiss_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _faiss_threads(faiss_before)


def _faiss_threads(n: int | None) -> int | None:
    """Set FAISS's OpenMP threads to ``n``; returns the previous count (None without faiss)."""
    try:
        import faiss
    except ImportError:
        return None
    before = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(n)
    return before


def mfli_retriever(run_dir: str | Path, beam: int | None = None, depth: int | None = None) -> MFLIIndex:
    """The MFLI index of a finished MFLI run (``index/mfli/``)."""
    run = RunDir(Path(run_dir))
    return MFLIIndex.load(run.index_dir / "mfli", beam=beam, depth=depth)


def add_cold_items(index: MFLIIndex, item_ids: torch.Tensor, embed: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> int:
    """Remove ``item_ids`` and add them back through the real-time path with ``embed(ids)``'s
    facet vectors (``{facet: [N, D]}``; a facet left out leaves the items out of it).

    With :func:`content_embedder` this is what brand-new items with the same content get.
    Ids not in the index are skipped. Returns how many were re-added.
    """
    ids = torch.tensor([int(i) for i in item_ids.tolist() if int(i) in index], dtype=torch.int64)
    if ids.numel() == 0:
        return 0
    vectors = embed(ids)
    index.remove_items(ids)
    index.add_items(ids, vectors)
    return int(ids.numel())


def content_embedder(run_dir: str | Path) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """Raw item ids ``[N]`` → their facet vectors from content alone, through an MFLI run's
    exported :class:`~training.index.content_encoder.ContentEncoder` and its dataset's items."""
    import pyarrow as pa

    from training.index.content_encoder import ENCODER_DIR, ContentEncoder

    run = RunDir(Path(run_dir))
    directory = run.mfli_index_dir / ENCODER_DIR
    if not directory.exists():
        raise FileNotFoundError(f"{directory} is missing: the run predates the content encoder; retrain it")
    encoder = ContentEncoder.load(directory)
    dataset = Path(run.read_json(run.mfli_index_dir / "index.json")["dataset"])
    items = pq.read_table(dataset / "items.parquet")
    catalogue = items.column("item_id").to_numpy()
    order = np.argsort(catalogue)

    def embed(ids: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = ids.numpy()
        at = order[np.searchsorted(catalogue, wanted, sorter=order).clip(max=len(order) - 1)]
        if not (catalogue[at] == wanted).all():
            raise KeyError(f"item ids not in {dataset}: {wanted[catalogue[at] != wanted][:5].tolist()}")
        return encoder.encode(items.take(pa.array(at)))

    return embed


def evaluate_mfli_run(run_dir: str | Path, ks: list[int], beam: int | None = None) -> list[dict]:
    """``rayrec eval`` rows of an MFLI run: the lookup (``mfli``) and brute force (``mfli_exact``).

    Same row format as ``training.eval.run_eval.evaluate_run`` (metrics per user, items scored
    and ms per query on one thread), plus the lookup's Recall@max(ks) against its own exact
    top list.
    """
    from training.eval.harness import evaluate_sums, finalize
    from training.eval.run_eval import load_test_set
    from training.retrieval.exact import ExactRetriever, read_embedding_table

    run = RunDir(Path(run_dir))
    data = load_test_set(run)
    item_ids, item_emb = read_embedding_table(run.index_dir / "items.parquet", "item_id")
    retrievers = {"mfli": mfli_retriever(run.path, beam=beam), "mfli_exact": ExactRetriever(item_ids, item_emb)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [{"system": name, **finalize(evaluate_sums(r, data, ks))} for name, r in retrievers.items()]
        k = max(ks)
        own, _ = top_k_all(retrievers["mfli_exact"], data, k)
        got, _ = top_k_all(retrievers["mfli"], data, k)
    finally:
        torch.set_num_threads(before)
    rows[0][f"top{k}_overlap_vs_own_exact"] = overlap_at(got, own)
    return rows
