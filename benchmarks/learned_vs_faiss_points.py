"""The curves of ``bench_learned_vs_faiss.py``: each learned index's beam sweep and every FAISS kind
built over the same vectors, measured for quality against the system's own exact top-100 and for
latency in interleaved rounds; the verdicts read off them; quality of the default points over seeds.

Why a module of its own: measuring is one job and reporting (``learned_vs_faiss_report.py``)
another; the benchmark's CLI only wires them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from training.eval.harness import EvalSet
from training.eval.retrieval_bench import Popularity, interleaved_latency, mfli_retriever, score_retriever
from training.eval.run_eval import PopularityRetriever, load_test_set
from training.index.hsnn_index import HSNNIndex, RescoredRetriever, with_user_packs
from training.retrieval.exact import ExactRetriever
from training.retrieval.faiss_retriever import FaissConfig, FaissRetriever
from training.runs import RunDir

DATASET = "ml-100k"
KS = [10, 100]
OVERLAP = "top100_overlap_vs_own_exact"
MFLI_BEAMS = [1, 2, 4, 8, 16, 32, 64]
HSNN_BEAMS = [1, 2, 4, 8, 16, 32, 64, 128]
IVF_NLISTS = [16, 32, 64, 128]
RCQ = [(2, 3), (2, 4)]  # levels x bits: 64 and 256 lists
HNSW_MS = [8, 16, 32]
HNSW_EFS = [16, 64, 128, 256, 512]  # FAISS searches with max(efSearch, k): below 100 acts as 100
RERANK_FETCH = [100, 300]


def nprobes(nlist: int) -> list[int]:
    """Powers of two up to ``nlist`` (the last one exhaustive)."""
    return [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p < nlist] + [nlist]


@dataclass
class Point:
    """One (system, build params, knob) point of a curve, with what it measured."""

    system: str
    params: dict[str, Any]
    setup: Callable[[], Any]
    data: EvalSet
    reference: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def curve(self) -> str:
        """The curve this point belongs to: the system and its params minus the swept knob."""
        fixed = {k: v for k, v in self.params.items() if k not in ("beam", "nprobe", "efSearch")}
        return self.system + "".join(f" {k}={v}" for k, v in fixed.items() if k != "vectors")

    @property
    def knob(self) -> str:
        return next((f"{k}={self.params[k]}" for k in ("beam", "nprobe", "efSearch") if k in self.params), "-")


def mfli_points(run: RunDir, quick: bool) -> tuple[list[Point], dict[str, tuple[Any, EvalSet]], int]:
    """MFLI beam sweep and every FAISS kind over the MFLI lookup's own item vectors."""
    data = load_test_set(run)
    index = mfli_retriever(run.path, beam=16, depth=1)
    ids, emb = index.item_vectors()
    exact = ExactRetriever(ids, emb)
    refs = {"mfli_exact": (exact, data)}
    points = [Point("mfli", {"vectors": "mfli", "beam": b, "depth": 1}, _set_beam(index, b), data, "mfli_exact")
              for b in (MFLI_BEAMS[::2] if quick else MFLI_BEAMS)]
    points += faiss_points(ids, emb, data, "mfli", "mfli_exact", quick)
    return points, refs, len(ids)


def hsnn_points(run: RunDir, quick: bool) -> tuple[list[Point], dict[str, tuple[Any, EvalSet]], int]:
    """HSNN beam sweep; FAISS over the MoNN's dot-term vectors, alone and re-ranked by the MoNN."""
    base = load_test_set(run)
    packs = with_user_packs(run.index_dir, base)
    index = HSNNIndex.load(run.index_dir / "hsnn")
    ids, dot = index.tree.item_ids, index.dot_vectors()
    dot_data = EvalSet(packs.user_ids, packs.user_emb[:, : index.dim].contiguous(), packs.targets, packs.exclude)
    refs = {"hsnn_exhaustive": (index.with_beam(None), packs), "hsnn_dot_exact": (ExactRetriever(ids, dot), dot_data)}
    points = [Point("hsnn_beam", {"vectors": "hsnn", "node_scoring": index.node_scoring, "beam": b},
                    (lambda b=b: index.with_beam(b)), packs, "hsnn_exhaustive")
              for b in (HSNN_BEAMS[::2] if quick else HSNN_BEAMS)]
    points += faiss_points(ids, dot, dot_data, "hsnn", "hsnn_dot_exact", quick)
    # the two-stage pipeline: FAISS candidates over the dot term, re-ranked by the MoNN
    for cfg, knobs in ((FaissConfig("ivf", nlist=64), nprobes(64)), (FaissConfig("hnsw", m=16), HNSW_EFS[1:])):
        faiss_index = FaissRetriever(ids, dot, cfg)
        for fetch in RERANK_FETCH[:1] if quick else RERANK_FETCH:
            for value in knobs[::2] if quick else knobs:
                params = {"vectors": "hsnn", **cfg.build_params(), "rerank": "monn", "fetch": fetch, cfg.knob: value}
                setup = (lambda f=faiss_index, v=value, n=fetch: RescoredRetriever(index, f.set_knob(v), n))
                points.append(Point(f"faiss_{cfg.kind}", params, setup, packs, "hsnn_exhaustive"))
    return points, refs, len(ids)


def faiss_points(ids: torch.Tensor, emb: torch.Tensor, data: EvalSet, vectors: str, reference: str, quick: bool) -> list[Point]:
    """IVF-Flat (nlist swept), IVF-RCQ and HNSW (M swept) over ``emb``, each knob swept."""
    configs = [FaissConfig("ivf", nlist=n) for n in (IVF_NLISTS[1:3] if quick else IVF_NLISTS)]
    configs += [FaissConfig("ivf_rq", rq_levels=l, rq_bits=b) for l, b in (RCQ[:1] if quick else RCQ)]
    configs += [FaissConfig("hnsw", m=m) for m in (HNSW_MS[1:2] if quick else HNSW_MS)]
    points = []
    for cfg in configs:
        index = FaissRetriever(ids, emb, cfg)
        knobs = HNSW_EFS if cfg.kind == "hnsw" else nprobes(index.config.nlist)
        for value in knobs[::2] if quick else knobs:
            params = {"vectors": vectors, **cfg.build_params(), cfg.knob: value}
            points.append(Point(f"faiss_{cfg.kind}", params, (lambda i=index, v=value: i.set_knob(v)), data, reference))
    return points


def _set_beam(index, beam: int) -> Callable[[], Any]:
    def setup():
        index.beam = beam
        return index

    return setup


def measure(points: list[Point], refs: dict[str, tuple[Any, EvalSet]], pop: Popularity, calls: int, calls256: int) -> dict[str, torch.Tensor]:
    """Quality of every point against its reference, then interleaved latency at batch 1 and 256."""
    tops = {name: score_retriever(r, d, pop, [100])[1] for name, (r, d) in refs.items()}
    for p in points:
        m, _ = score_retriever(p.setup(), p.data, pop, KS, reference=tops[p.reference])
        p.metrics = {"recall@10": m["recall@10"], "recall@100": m["recall@100"], OVERLAP: m["top100_overlap_vs_own_exact"],
                     "items_scored": m["items_scored"]}
    print(f"  quality of {len(points)} points measured", flush=True)
    keyed = [(i, p.setup, p.data) for i, p in enumerate(points)]
    for batch, n, rounds in ((1, calls, 10), (256, calls256, min(calls256, 5))):
        timed = interleaved_latency(keyed, calls=n, rounds=rounds, batch=batch)
        for i, p in enumerate(points):
            p.metrics[f"p50_ms_b{batch}"] = timed[i]["latency_ms_p50"]
            p.metrics[f"cpu_ms_b{batch}"] = timed[i]["cpu_ms_p50"]
        print(f"  latency at batch {batch} measured", flush=True)
    return tops


def frontier_at(points: list[Point], latency: float, key: str, metric: str = OVERLAP) -> Point | None:
    """The best point (on ``metric``) among ``points`` no slower than ``latency``."""
    fast = [p for p in points if p.metrics[key] <= latency]
    return max(fast, key=lambda p: p.metrics[metric]) if fast else None


def verdict(learned: list[Point], faiss: list[Point], key: str) -> list[dict[str, Any]]:
    """For each learned point: FAISS's best overlap at no more latency, and which point gave it."""
    out = []
    for p in learned:
        best = frontier_at(faiss, p.metrics[key], key)
        out.append({"learned": p, "faiss": best, "at_or_above": best is None or p.metrics[OVERLAP] >= best.metrics[OVERLAP]})
    return out


def seeds_quality(kind: str, runs: list[RunDir], faiss_cfg: tuple[FaissConfig, int] | None) -> dict[str, list[dict[str, float]]]:
    """Recall and overlap of the learned index's default point, its exact, popularity and the
    chosen FAISS point on every run (the spread over seeds)."""
    out: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        pop = Popularity.from_run(run)
        base = load_test_set(run)
        if kind == "mfli":
            index = mfli_retriever(run.path, beam=None, depth=1)
            ids, emb = index.item_vectors()
            data = faiss_data = base
            exact = ExactRetriever(ids, emb)
            systems = {"mfli": (index, data, "own"), "mfli_exact": (exact, data, "own")}
            refs = {"own": (exact, data)}
        else:
            index = HSNNIndex.load(run.index_dir / "hsnn")
            data = with_user_packs(run.index_dir, base)
            ids, emb = index.tree.item_ids, index.dot_vectors()
            faiss_data = EvalSet(data.user_ids, data.user_emb[:, : index.dim].contiguous(), data.targets, data.exclude)
            exact = index.with_beam(None)
            systems = {"hsnn_beam": (index, data, "own"), "hsnn_exhaustive": (exact, data, "own")}
            refs = {"own": (exact, data), "dot": (ExactRetriever(ids, emb), faiss_data)}
        systems["popularity"] = (PopularityRetriever(pop.item_ids, pop.counts.to(torch.float64)), data, None)
        if faiss_cfg is not None:
            cfg, value = faiss_cfg
            systems[f"faiss_{cfg.kind}"] = (FaissRetriever(ids, emb, cfg).set_knob(value), faiss_data, "own" if kind == "mfli" else "dot")
        tops = {name: score_retriever(r, d, pop, [100])[1] for name, (r, d) in refs.items()}
        for name, (retriever, ds, ref) in systems.items():
            m, _ = score_retriever(retriever, ds, pop, KS, reference=tops[ref] if ref else None)
            row = {"recall@10": m["recall@10"], "recall@100": m["recall@100"]}
            if ref:
                row[OVERLAP] = m["top100_overlap_vs_own_exact"]
            out.setdefault(name, []).append(row)
    return out


