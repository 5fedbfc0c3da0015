"""The curves of ``bench_learned_vs_faiss.py``: each learned index's beam sweep and every FAISS kind
built over the same vectors, measured for quality against the system's own exact top-100 and for
latency in interleaved rounds; the verdicts read off them; quality of the default points over seeds.

Why a module of its own: measuring is one job and reporting (``learned_vs_faiss_report.py``)
another; the benchmark's CLI only wires them.
"""

from __future__ import annotations

import gc
import time
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

KS = [10, 100]
OVERLAP = "top100_overlap_vs_own_exact"
RERANK_FETCH = [100, 300]


@dataclass(frozen=True)
class Scale:
    """The sweeps for one catalogue: what is swept where the two sizes differ.

    Why per catalogue: on ml-100k's 1,682 items an nlist of 1,024 has fewer than 2 items per list
    and MFLI's depth-1 lists are its whole partition; on 1,000,000 items the lists must be larger
    and MFLI serves at depth 2 (its config's ``depth``), with beams up to 1,024 of 65,536 prefixes.
    """

    dataset: str
    mfli_beams: tuple[int, ...]
    mfli_depth: int
    mfli_default: int  # the beam the shipped config serves with
    hsnn_beams: tuple[int, ...]
    hsnn_default: int
    ivf_nlists: tuple[int, ...]
    rcq: tuple[tuple[int, int], ...]  # levels x bits
    hnsw_ms: tuple[int, ...]
    hnsw_efs: tuple[int, ...]  # FAISS searches with max(efSearch, k): below 100 acts as 100
    max_nprobe: int  # the widest probe swept (ml-100k: every list)
    users: int | None  # a seeded sample of test users (EvalSet.sample(users, 0)); None: all
    suffix: str  # the report's file-name suffix

    def nprobes(self, nlist: int) -> list[int]:
        """Powers of two up to ``nlist`` or ``max_nprobe``, whichever is smaller (``nlist`` itself when it is)."""
        top = min(nlist, self.max_nprobe)
        return [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p < top] + [top]

    def test_set(self, run: RunDir) -> EvalSet:
        data = load_test_set(run)
        return data.sample(self.users, 0) if self.users else data


SCALES = {
    "ml-100k": Scale("ml-100k", (1, 2, 4, 8, 16, 32, 64), 1, 16, (1, 2, 4, 8, 16, 32, 64, 128), 64, (16, 32, 64, 128),
                     ((2, 3), (2, 4)), (8, 16, 32), (16, 64, 128, 256, 512), 256, None, ""),
    # the same 1,000 test users as retrieval_synth1m.md (EvalSet.sample(1000, 0))
    "synth-1m": Scale("synth-1m", (4, 8, 16, 32, 64, 128, 256, 1024), 2, 256, (16, 64, 128, 256, 512), 256, (1024, 4096),
                      ((2, 5), (2, 6)), (16, 32), (16, 64, 128, 256, 512), 256, 1000, "_synth1m"),
}


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


def mfli_points(run: RunDir, scale: Scale, quick: bool) -> tuple[list[Point], dict[str, tuple[Any, EvalSet]], int]:
    """MFLI beam sweep and every FAISS kind over the MFLI lookup's own item vectors."""
    data = scale.test_set(run)
    index = mfli_retriever(run.path, beam=scale.mfli_default, depth=scale.mfli_depth)
    ids, emb = index.item_vectors()
    exact = ExactRetriever(ids, emb)
    refs = {"mfli_exact": (exact, data)}
    beams = scale.mfli_beams[::2] if quick else scale.mfli_beams
    points = [Point("mfli", {"vectors": "mfli", "beam": b, "depth": scale.mfli_depth}, _set_beam(index, b), data, "mfli_exact")
              for b in beams]
    points += faiss_points(ids, emb, data, "mfli", "mfli_exact", scale, quick)
    return points, refs, len(ids)


def hsnn_points(run: RunDir, scale: Scale, quick: bool) -> tuple[list[Point], dict[str, tuple[Any, EvalSet]], int]:
    """HSNN beam sweep; FAISS over the MoNN's dot-term vectors, alone and re-ranked by the MoNN."""
    base = scale.test_set(run)
    packs = with_user_packs(run.index_dir, base)
    index = HSNNIndex.load(run.index_dir / "hsnn")
    ids, dot = index.tree.item_ids, index.dot_vectors()
    dot_data = EvalSet(packs.user_ids, packs.user_emb[:, : index.dim].contiguous(), packs.targets, packs.exclude)
    refs = {"hsnn_exhaustive": (index.with_beam(None), packs), "hsnn_dot_exact": (ExactRetriever(ids, dot), dot_data)}
    points = [Point("hsnn_beam", {"vectors": "hsnn", "node_scoring": index.node_scoring, "beam": b},
                    (lambda b=b: index.with_beam(b)), packs, "hsnn_exhaustive")
              for b in (scale.hsnn_beams[::2] if quick else scale.hsnn_beams)]
    points += faiss_points(ids, dot, dot_data, "hsnn", "hsnn_dot_exact", scale, quick)
    # the two-stage pipeline: FAISS candidates over the dot term, re-ranked by the MoNN
    nlist = scale.ivf_nlists[len(scale.ivf_nlists) // 2]
    for cfg, knobs in ((FaissConfig("ivf", nlist=nlist), scale.nprobes(nlist)), (FaissConfig("hnsw", m=16), list(scale.hnsw_efs[1:]))):
        faiss_index = FaissRetriever(ids, dot, cfg)
        for fetch in RERANK_FETCH[:1] if quick else RERANK_FETCH:
            for value in knobs[::2] if quick else knobs:
                params = {"vectors": "hsnn", **cfg.build_params(), "rerank": "monn", "fetch": fetch, cfg.knob: value}
                setup = (lambda f=faiss_index, v=value, n=fetch: RescoredRetriever(index, f.set_knob(v), n))
                points.append(Point(f"faiss_{cfg.kind}", params, setup, packs, "hsnn_exhaustive"))
    return points, refs, len(ids)


def faiss_points(ids: torch.Tensor, emb: torch.Tensor, data: EvalSet, vectors: str, reference: str, scale: Scale,
                 quick: bool) -> list[Point]:
    """IVF-Flat (nlist swept), IVF-RCQ and HNSW (M swept) over ``emb``, each knob swept."""
    configs = [FaissConfig("ivf", nlist=n) for n in (scale.ivf_nlists[1:3] if quick else scale.ivf_nlists)]
    configs += [FaissConfig("ivf_rq", rq_levels=l, rq_bits=b) for l, b in (scale.rcq[:1] if quick else scale.rcq)]
    configs += [FaissConfig("hnsw", m=m) for m in (scale.hnsw_ms[1:2] if quick else scale.hnsw_ms)]
    points = []
    for cfg in configs:
        t0 = time.perf_counter()
        index = FaissRetriever(ids, emb, cfg)
        print(f"  built faiss {cfg.kind} {cfg.build_params()} in {time.perf_counter() - t0:.0f}s", flush=True)
        knobs = list(scale.hnsw_efs) if cfg.kind == "hnsw" else scale.nprobes(index.config.nlist)
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


def seeds_quality(kind: str, runs: list[RunDir], faiss_cfg: tuple[FaissConfig, int] | None, scale: Scale) -> dict[str, list[dict[str, float]]]:
    """Recall and overlap of the learned index's default point, its exact, popularity and the
    chosen FAISS point on every run (the spread over seeds)."""
    out: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        pop = Popularity.from_run(run)
        base = scale.test_set(run)
        if kind == "mfli":
            index = mfli_retriever(run.path, beam=scale.mfli_default, depth=scale.mfli_depth)
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
        del index, exact, systems, refs, tops  # one seed's index and references in memory at a time
        gc.collect()
    return out


def released() -> Any:
    """A measured point's ``setup`` once its index is freed (``bench_learned_vs_faiss.main``)."""
    raise RuntimeError("this point was measured and its index released")


