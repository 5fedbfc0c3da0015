"""Learned indexes vs FAISS on the same vectors (issue 27, retrieval): MFLI and HSNN on ml-100k or the 1M catalogue.

Why this benchmark: ``retrieval.md`` and ``retrieval_synth1m.md`` build FAISS over the two-tower's
embeddings while MFLI and HSNN score their own, so they compare models, not indexes. Here every
FAISS index is built over the item vectors the learned index itself scores and queried with the
same user vector (``vectors`` param: ``mfli`` or ``hsnn``), and each system is judged against its
own exact top-100:

- MFLI: FAISS over the concatenated facet vectors the MFLI lookup scores exactly
  (``MFLIIndex.item_vectors``), queried with the run's user vector. Own exact: brute force over
  those vectors (the same reference for MFLI and for FAISS).
- HSNN: its MoNN is not an inner product, so no MIPS index holds what it scores. FAISS is built
  over the MoNN's item-level dot-product term (``HSNNIndex.dot_vectors``) and queried with the
  pack's user vector ``u``; judged alone (own exact: the exact dot-term top-100), and as the
  two-stage pipeline one would deploy, FAISS candidates re-ranked by the MoNN
  (``RescoredRetriever``, param ``rerank: monn``), judged against HSNN's own exact (exhaustive
  MoNN), the same reference as HSNN's beam search.

Swept: MFLI beam, HSNN beam; FAISS IVF-Flat (nlist x nprobe), IVF over a residual coarse
quantizer (RCQ levels x bits, nprobe) and HNSW (M x efSearch). Per point: ``top100_overlap_vs_own_exact``,
``recall@10``, ``recall@100`` (test, leave-one-out, full ranking, seen items masked) and p50
latency per ``search`` call at batch 1 and batch 256 on one thread, every point timed in
interleaved rounds in one process. A ``popularity`` row. Quality of the default points over
every run passed (mean and standard error over seeds).

Writes ``docs/benchmarks/retrieval_same_vectors.{md,json}`` and one PNG per learned index
(``--dataset synth-1m``: ``retrieval_same_vectors_synth1m.*``, wider sweeps and 1,000 sampled test
users, ``Scale`` in ``learned_vs_faiss_points.py``).

Run::

    python benchmarks/bench_learned_vs_faiss.py --mfli-runs runs/a runs/b --hsnn-runs runs/c runs/d
    python benchmarks/bench_learned_vs_faiss.py            # trains one MFLI and one HSNN run (seed 42)
    python benchmarks/bench_learned_vs_faiss.py --dataset synth-1m --only mfli --mfli-runs <configs/synth1m-mfli.yaml runs>
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_retrieval import train  # noqa: E402
from benchmarks.learned_vs_faiss_points import SCALES, frontier_at, hsnn_points, measure, mfli_points, released, seeds_quality, verdict  # noqa: E402
from benchmarks.learned_vs_faiss_report import write  # noqa: E402
from training.eval.retrieval_bench import Popularity  # noqa: E402
from training.retrieval.faiss_retriever import FaissConfig  # noqa: E402
from training.runs import RunDir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SCALES), default="ml-100k",
                        help="the catalogue the runs were trained on; picks the sweeps and the report's name (default ml-100k)")
    parser.add_argument("--users", type=int, help="score a seeded sample of this many test users (default: the dataset's, "
                        "every user on ml-100k, 1,000 on synth-1m; HSNN's exhaustive reference costs ~0.4 s a user at 1M)")
    parser.add_argument("--mfli-runs", type=Path, nargs="*", default=[], help="finished configs/ml100k-mfli.yaml (or synth1m-mfli.yaml) runs (seeds); the first draws the curves")
    parser.add_argument("--hsnn-runs", type=Path, nargs="*", default=[], help="finished configs/ml100k-hsnn.yaml (or synth1m-hsnn.yaml) runs (seeds)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--calls", type=int, default=200, help="search calls timed per point at batch 1 (10 rounds)")
    parser.add_argument("--calls256", type=int, default=10, help="search calls timed per point at batch 256 (5 rounds)")
    parser.add_argument("--quick", action="store_true", help="every other sweep value (a smoke run)")
    parser.add_argument("--only", choices=["mfli", "hsnn"], help="measure one learned index")
    args = parser.parse_args()
    scale = SCALES[args.dataset] if args.users is None else dataclasses.replace(SCALES[args.dataset], users=args.users)
    t_start = time.perf_counter()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    mfli_runs = [RunDir(p.resolve()) for p in args.mfli_runs]
    hsnn_runs = [RunDir(p.resolve()) for p in args.hsnn_runs]
    kinds = [args.only] if args.only else ["mfli", "hsnn"]
    if ("mfli" in kinds and not mfli_runs) or ("hsnn" in kinds and not hsnn_runs):
        if args.dataset != "ml-100k":
            parser.error(f"--dataset {args.dataset} measures finished runs: pass --mfli-runs / --hsnn-runs (or --only)")
        import ray

        ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            if "mfli" in kinds and not mfli_runs:
                mfli_runs = [train("configs/ml100k-mfli.yaml", args.runs_dir, f"bench-mfli-{stamp}", None)]
            if "hsnn" in kinds and not hsnn_runs:
                hsnn_runs = [train("configs/ml100k-hsnn.yaml", args.runs_dir, f"bench-hsnn-{stamp}", None)]
        finally:
            ray.shutdown()
    torch.set_num_threads(1)
    import faiss

    pop = Popularity.from_run((mfli_runs or hsnn_runs)[0])
    results: dict[str, dict[str, Any]] = {}
    todo = {"mfli": (mfli_runs, mfli_points), "hsnn": (hsnn_runs, hsnn_points)}
    for kind in kinds:
        runs, build = todo[kind]
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # building (k-means, HNSW inserts) may use every core
        points, refs, n_items = build(runs[0], scale, args.quick)
        faiss.omp_set_num_threads(1)  # searching is timed on one thread
        print(f"{kind}: {len(points)} points over {n_items} items", flush=True)
        measure(points, refs, pop, args.calls, args.calls256)
        # the curves' FAISS indexes and references (1M items: several GB) go before the seeds
        # below load their own; a 3-seed HSNN run at 1M was OOM-killed (24 GB) with them kept
        for p in points:
            p.setup = released
        del refs
        gc.collect()
        learned = [p for p in points if not p.system.startswith("faiss")]
        alone = [p for p in points if p.system.startswith("faiss") and "rerank" not in p.params]
        reranked = [p for p in points if "rerank" in p.params]
        results[kind] = {"points": points, "learned": learned, "faiss": alone, "reranked": reranked, "n_items": n_items,
                         "verdict": {b: verdict(learned, alone, f"p50_ms_b{b}") for b in (1, 256)},
                         "verdict_cpu": {b: verdict(learned, alone, f"cpu_ms_b{b}") for b in (1, 256)},
                         "verdict_rerank": {b: verdict(learned, reranked, f"p50_ms_b{b}") for b in (1, 256)} if reranked else None,
                         "verdict_rerank_cpu": {b: verdict(learned, reranked, f"cpu_ms_b{b}") for b in (1, 256)} if reranked else None,
                         "verdict_items": verdict(learned, alone, "items_scored"),
                         "seconds": time.perf_counter() - t0}
        print(f"{kind} measured in {time.perf_counter() - t0:.0f}s", flush=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # the seeds' FAISS builds; nothing below is timed
    # the default point of each learned index (its config's beam) and the FAISS point that beats or
    # trails it by the most at no more batch-1 latency: quality over every seed
    for kind in kinds:
        runs, res = todo[kind][0], results[kind]
        default = next(p for p in res["learned"] if p.params["beam"] == (scale.mfli_default if kind == "mfli" else scale.hsnn_default))
        best = frontier_at(res["faiss"], default.metrics["p50_ms_b1"], "p50_ms_b1")
        res["default"], res["faiss_at_default"] = default, best
        cfg = None
        if best is not None:
            fixed = {k: v for k, v in best.params.items() if k in ("nlist", "M", "rcq")}
            kind_f = best.system.removeprefix("faiss_")
            faiss_cfg = FaissConfig(kind_f, nlist=fixed.get("nlist", 64), m=fixed.get("M", 32),
                                    rq_levels=int(str(fixed.get("rcq", "2x3")).split("x")[0]), rq_bits=int(str(fixed.get("rcq", "2x3")).split("x")[1]))
            cfg = (faiss_cfg, best.params.get("nprobe", best.params.get("efSearch")))
        res["seeds"] = seeds_quality(kind, runs, cfg, scale)
        res["runs"] = [r.run_id for r in runs]
    total = time.perf_counter() - t_start
    write(args.out, results, total, scale)
    print(f"done in {total:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
