"""The serving benchmark's in-process measurements: the app's own retriever and ranker, called
directly in this process on the same requests the HTTP phases send.

- :func:`overhead`: sequential retrieve + rank in-process vs the same through Serve;
- :func:`fm_quality_paired`: the FM's NDCG@10 gain on the replayed events with everything else
  held fixed, and the share of it precompute kept at the hit pattern it served.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from results import row
from traffic import Poster, expect_200  # benchmarks/traffic.py


def load_inprocess(run_dir: Path, factory: str, ranker_run: Path | None) -> tuple[Any, Any]:
    """The retrieval index and ranking stage the app serves, loaded here (one torch thread, as a
    replica runs): ``(RetrievalIndex, RankingStage)``."""
    import torch

    from serving.ranker import RankingStage
    from serving.ranking_models import resolve_factory
    from serving.retriever import RetrievalIndex
    from serving.run_index import index_dir

    torch.set_num_threads(1)
    return RetrievalIndex(index_dir(run_dir)), RankingStage(resolve_factory(factory)(str(ranker_run or run_dir)))


def overhead(url: str, index: Any, stage: Any, users: list[int], rows: list, dataset: str) -> None:
    """Sequential requests: in-process (retrieve + rank, FM off) vs the same through Serve."""
    from serving.ranker import RankQuery
    from serving.retriever import Query

    sample = users[:150]
    inproc = []
    for user in sample:
        t0 = time.perf_counter()
        answer = index.search([Query(user, 50, exclude_seen=False)])[0]
        stage.rank([RankQuery(user, answer.item_ids, 10)], None, None)
        inproc.append((time.perf_counter() - t0) * 1e3)
    served = []
    with Poster(url) as post:
        for user in sample:
            t0 = time.perf_counter()
            expect_200(post("/recommend", {"user_id": user, "k": 10, "exclude_seen": False}))
            served.append((time.perf_counter() - t0) * 1e3)
    p50_in, p50_serve = statistics.median(inproc), statistics.median(served)
    print(f"  in-process p50 {p50_in:.2f} ms, through Serve p50 {p50_serve:.2f} ms", flush=True)
    rows += [
        row("inprocess", dataset, "p50_ms", p50_in, fm_mode="off", sequential=True),
        row("inprocess", dataset, "p99_ms", float(np.percentile(inproc, 99)), fm_mode="off", sequential=True),
        row("serve", dataset, "p50_ms", p50_serve, fm_mode="off", sequential=True),
        row("serve", dataset, "p99_ms", float(np.percentile(served, 99)), fm_mode="off", sequential=True),
        row("serve", dataset, "overhead_ratio", p50_serve / p50_in, fm_mode="off", stat="p50"),
    ]


def ranked_off_and_sync(index: Any, stage: Any, user: int, candidates: int) -> tuple[list[int], list[int]]:
    """The user's top 10 of its ``candidates`` retrieved items, ranked with no FM and with the FM
    computed for every candidate (what ``sync`` serves): the pair every paired FM measurement
    compares. Without exclude_seen the pair depends on the user only."""
    from serving.ranker import RankQuery
    from serving.retriever import Query

    answer = index.search([Query(user, candidates, exclude_seen=False)])[0]
    query = [RankQuery(user, answer.item_ids, 10)]
    fm, present = stage.compute_fm(query)
    return stage.rank(query, None, None)[0][0], stage.rank(query, fm, present)[0][0]


def fm_quality_paired(index: Any, stage: Any, users: list[int], quality: Any, event_hits: dict[int, float], n: int,
                      rows: list, dataset: str, candidates: int) -> dict:  # fmt: skip
    """The FM's NDCG@10 gain on the replayed events, measured paired and in-process: each event's
    retrieval candidates ranked with no FM and with the FM computed for every candidate (what
    ``sync`` serves), so the only difference is the FM. A live window's NDCG moves with which
    requests were served in time; this one does not. The share of that gain precompute keeps
    is then Σ h·Δ / Σ Δ over events, h = the event's served ``fm_from_cache`` (exact for whole
    hits and misses, which most requests are; linear in between), reported only when the gain
    is above twice its standard error. ``quality``: bench_serving's ``Quality`` (event, user, ids) → NDCG@10."""
    off, sync = [], []
    for i in range(n):
        ids_off, ids_sync = ranked_off_and_sync(index, stage, users[i], candidates)
        off.append(quality(i, users[i], ids_off))
        sync.append(quality(i, users[i], ids_sync))
    delta = np.asarray(sync) - np.asarray(off)
    se = float(delta.std() / math.sqrt(len(delta)))
    hits = np.asarray([event_hits.get(i, np.nan) for i in range(n)])
    served = ~np.isnan(hits)
    retained = None
    if delta.mean() > 2 * se and served.any() and delta[served].sum() > 0:
        retained = float((hits[served] * delta[served]).sum() / delta[served].sum())
    out = {"events": n, "ndcg_off": float(np.mean(off)), "ndcg_sync": float(np.mean(sync)), "gain": float(delta.mean()),
           "gain_se": se, "lists_changed": int((delta != 0).sum()), "gain_retained": retained}  # fmt: skip
    print(f"  paired in-process: NDCG@10 off {out['ndcg_off']:.4f} sync {out['ndcg_sync']:.4f} "
          f"(gain {out['gain']:+.4f} ± {se:.4f}, NDCG changes in {out['lists_changed']} of {n} events); retained {retained}", flush=True)
    rows += [
        row("inprocess", dataset, "ndcg@10", out["ndcg_off"], fm_mode="off", paired=True, events=n),
        row("inprocess", dataset, "ndcg@10", out["ndcg_sync"], fm_mode="sync", paired=True, events=n),
        row("inprocess", dataset, "fm_lists_changed", out["lists_changed"], events=n),
        row("serve_precompute", dataset, "fm_gain_retained_paired", retained, events=n,
            note_if_null="the FM's paired NDCG gain on the replay is within twice its standard error"),
    ]
    return out
