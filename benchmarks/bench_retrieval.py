"""Retrieval benchmark (issue 4): MFLI lookup vs exact search vs FAISS on ml-100k.

Trains, in one run, a two-tower (configs/ml100k.yaml) and an MFLI model
(configs/ml100k-mfli.yaml) on 2 Ray Train workers, then scores on the test split
(leave-one-out, full ranking, seen items masked):

- mfli (beam search over the codes), mfli_exact (brute force over the same embeddings),
  two_tower_exact, faiss_ivf and faiss_hnsw (over the two-tower embeddings);
- Recall@10/50/100, NDCG@10, Recall@100 against the model's own exact top-100, items scored;
- latency per search call on one thread at batch 1 and 256 (p50, p99);
- a recall–latency curve over MFLI beam widths, IVF nprobe and HNSW efSearch (one PNG);
- cold-item recall (targets with < 5 training interactions), and for MFLI the same after
  those items were removed and re-added from content alone through the real-time path;
- the share of top-10 slots taken by the 1% most popular items.

Writes docs/benchmarks/retrieval.{md,json} and retrieval_curve.png.

Run: ``make bench-retrieval`` (``python benchmarks/bench_retrieval.py``); ``--mfli-run`` /
``--two-tower-run`` reuse finished runs instead of training.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from training.eval.retrieval_bench import (
    Popularity,
    add_cold_items,
    content_embedder,
    interleaved_latency,
    latency,
    mfli_retriever,
    score_retriever,
)
from training.eval.run_eval import load_test_set
from training.retrieval.exact import ExactRetriever, read_embedding_table
from training.retrieval.faiss_retriever import FaissConfig, FaissRetriever
from training.runs import RunDir, git_commit, library_versions

KS = [10, 50, 100]
DATASET = "ml-100k"
MFLI_BEAMS = [1, 2, 4, 8, 16, 32]
IVF_NPROBES = [1, 2, 4, 8, 16, 32]
HNSW_EFS = [8, 16, 32, 64, 128, 256]
DEFAULT_BEAM, DEFAULT_NPROBE, DEFAULT_EF = 16, 8, 128


def train(config: str, runs_dir: Path, run_id: str, epochs: int | None) -> RunDir:
    """Train one run config on the local Ray (2 workers), return its run folder."""
    import importlib

    from training.config import load_config
    from training.jobs import JOBS

    overrides = [f"runs_dir={runs_dir}"] + ([f"train.epochs={epochs}"] if epochs else [])
    cfg = load_config(REPO / config, overrides)
    t0 = time.perf_counter()
    run = importlib.import_module(JOBS[cfg.kind]).run(cfg, run_id=run_id)
    print(f"trained {config} in {time.perf_counter() - t0:.0f}s → {run.path}", flush=True)
    return run


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem_kib = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20), "gpu": None,
            "load_average_1m": round(os.getloadavg()[0], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfli-run", type=Path, help="finished MFLI run folder (skip training it)")
    parser.add_argument("--two-tower-run", type=Path, help="finished two-tower run folder (skip training it)")
    parser.add_argument("--epochs", type=int, help="override train.epochs of both configs")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs", help="where trained runs go")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    parser.add_argument("--calls", type=int, default=200, help="search calls timed at batch 1")
    args = parser.parse_args()
    t_start = time.perf_counter()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")

    if args.mfli_run is None or args.two_tower_run is None:
        import ray

        ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    train_s = {}
    try:
        t0 = time.perf_counter()
        two_tower = RunDir(args.two_tower_run.resolve()) if args.two_tower_run else train(
            "configs/ml100k.yaml", args.runs_dir, f"bench-two-tower-{stamp}", args.epochs)
        train_s["two_tower_exact"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mfli_run = RunDir(args.mfli_run.resolve()) if args.mfli_run else train(
            "configs/ml100k-mfli.yaml", args.runs_dir, f"bench-mfli-{stamp}", args.epochs)
        train_s["mfli"] = time.perf_counter() - t0
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []

    def add(system: str, metric: str, value: float | None, note: str | None = None, dataset: str = DATASET,
            **params: Any) -> None:
        if system.startswith("faiss_"):  # whose item vectors the index holds (the spec's `vectors`)
            params.setdefault("vectors", "two_tower")
        row: dict[str, Any] = {"system": system, "dataset": dataset, "metric": metric,
                               "value": None if value is None else round(float(value), 6), "params": params}
        if note:
            row["note"] = note
        rows.append(row)

    # ---- the test users, embedded by each model (same users, same targets, same masks)
    tt_data = load_test_set(two_tower)
    mf_data = load_test_set(mfli_run)
    assert torch.equal(tt_data.targets, mf_data.targets), "both runs must read the same test split"
    pop = Popularity.from_run(mfli_run)
    tt_ids, tt_emb = read_embedding_table(two_tower.index_dir / "items.parquet", "item_id")
    mf_ids, mf_emb = read_embedding_table(mfli_run.index_dir / "items.parquet", "item_id")

    systems: dict[str, tuple[Any, Any, dict[str, Any]]] = {
        "mfli": (mfli_retriever(mfli_run.path, beam=DEFAULT_BEAM, depth=1), mf_data, {"beam": DEFAULT_BEAM, "depth": 1}),
        "mfli_exact": (ExactRetriever(mf_ids, mf_emb), mf_data, {}),
        "two_tower_exact": (ExactRetriever(tt_ids, tt_emb), tt_data, {}),
        "faiss_ivf": (FaissRetriever(tt_ids, tt_emb, FaissConfig("ivf", nlist=64, nprobe=DEFAULT_NPROBE)), tt_data, {"nlist": 64, "nprobe": DEFAULT_NPROBE}),
        "faiss_hnsw": (FaissRetriever(tt_ids, tt_emb, FaissConfig("hnsw", m=32, ef_search=DEFAULT_EF)), tt_data, {"M": 32, "efSearch": DEFAULT_EF}),
    }
    references = {}
    for own in ("mfli_exact", "two_tower_exact"):
        retriever, data, _ = systems[own]
        references[own] = score_retriever(retriever, data, pop, KS)[1]
    reference_of = {"mfli": "mfli_exact", "mfli_exact": "mfli_exact"}
    reference_of.update({s: "two_tower_exact" for s in ("two_tower_exact", "faiss_ivf", "faiss_hnsw")})
    table: dict[str, dict[str, float]] = {}
    for name, (retriever, data, params) in systems.items():
        metrics, _ = score_retriever(retriever, data, pop, KS, reference=references[reference_of[name]])
        table[name] = metrics
        for key in ("recall@10", "recall@50", "recall@100", "ndcg@10", "top100_overlap_vs_own_exact", "cold_recall@50", "top1pct_share@10"):
            add(name, key, metrics.get(key), **params)
        if name == "faiss_hnsw":
            add(name, "items_scored_frac", None, note="FAISS HNSW does not count the distances it computes", **params)
        else:
            add(name, "items_scored_frac", metrics["items_scored"] / len(mf_ids), **params)
        for batch, calls in ((1, args.calls), (256, 8)):
            lat = latency(retriever, data, batch, calls)
            table[name][f"p50_ms_b{batch}"] = lat["latency_ms_p50"]
            table[name][f"p99_ms_b{batch}"] = lat["latency_ms_p99"]
            add(name, "latency_ms_p50", lat["latency_ms_p50"], threads=1, batch=batch, **params)
            add(name, "latency_ms_p99", lat["latency_ms_p99"], threads=1, batch=batch, **params)
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in table[name].items()), flush=True)
    for name, seconds in train_s.items():
        if seconds > 1:
            add(name, "train_s", seconds, workers=2)

    # ---- cold items through the real-time path: removed, then re-added from content alone
    cold_targets = mf_data.targets[pop.count(mf_data.targets) < 5].unique()
    realtime = mfli_retriever(mfli_run.path, beam=DEFAULT_BEAM, depth=1)
    readded = add_cold_items(realtime, cold_targets, content_embedder(mfli_run.path))
    cold_rt, _ = score_retriever(realtime, mf_data, pop, KS)
    add("mfli", "cold_added_recall@50", cold_rt.get("cold_recall@50"), beam=DEFAULT_BEAM, items_readded=readded,
        note="cold test targets removed from the index and re-added from their content alone (the run's content encoder, both facets)")
    add("two_tower_exact", "cold_added_recall@50", None,
        note="a two-tower item needs a trained id row: no real-time path for items unseen in training")
    table["mfli"]["cold_added_recall@50"] = cold_rt.get("cold_recall@50", float("nan"))

    # ---- recall–latency curves: quality per knob, then batch-1 latency of every point in
    # interleaved rounds (a shared machine's slow minutes fall on every point alike)
    mfli_sweep = mfli_retriever(mfli_run.path, beam=MFLI_BEAMS[0], depth=1)
    ivf = FaissRetriever(tt_ids, tt_emb, FaissConfig("ivf", nlist=64, nprobe=1))
    hnsw = FaissRetriever(tt_ids, tt_emb, FaissConfig("hnsw", m=32, ef_search=8))

    def set_knob(system: str, value: int):
        if system == "mfli":
            mfli_sweep.beam = value
            return mfli_sweep
        return (ivf if system == "faiss_ivf" else hnsw).set_knob(value)

    sweeps = {"mfli": ("beam", MFLI_BEAMS, {"depth": 1}), "faiss_ivf": ("nprobe", IVF_NPROBES, {"nlist": 64}),
              "faiss_hnsw": ("efSearch", HNSW_EFS, {"M": 32})}
    data_of = {"mfli": mf_data, "faiss_ivf": tt_data, "faiss_hnsw": tt_data}
    quality: dict[tuple[str, int], dict[str, float]] = {}
    for system, (knob, values, fixed) in sweeps.items():
        ref = references["mfli_exact" if system == "mfli" else "two_tower_exact"]
        for value in values:
            m, _ = score_retriever(set_knob(system, value), data_of[system], pop, KS, reference=ref)
            quality[system, value] = m
            add(system, "recall@100", m["recall@100"], **{knob: value}, **fixed, curve=True)
            if system == "mfli":
                add(system, "top100_overlap_vs_own_exact", m["top100_overlap_vs_own_exact"], beam=value, depth=1, curve=True)
                add(system, "items_scored_frac", m["items_scored"] / len(mf_ids), beam=value, depth=1, curve=True)

    def setup(system: str, value: int):
        return lambda: set_knob(system, value)

    timed = interleaved_latency([(key, setup(*key), data_of[key[0]]) for key in quality], calls=args.calls, rounds=10)
    curve: dict[str, list[tuple[float, float, Any]]] = {"mfli": [], "faiss_ivf": [], "faiss_hnsw": []}
    for (system, value), m in quality.items():
        knob, _, fixed = sweeps[system]
        lat = timed[system, value]["latency_ms_p50"]
        curve[system].append((lat, m["recall@100"], value))
        add(system, "latency_ms_p50", lat, **{knob: value}, **fixed, threads=1, batch=1, curve=True)

    total_s = time.perf_counter() - t_start
    write_results(args.out, rows, table, curve, two_tower, mfli_run, total_s, len(mf_ids), len(mf_data.user_ids), int((pop.count(mf_data.targets) < 5).sum()))
    print(f"done in {total_s:.0f}s")
    return 0


def plot(curve: dict[str, list[tuple[float, float, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"mfli": "MFLI (beam)", "faiss_ivf": "FAISS IVF-Flat (nprobe)", "faiss_hnsw": "FAISS HNSW (efSearch)"}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curve.items():
        xs, ys, _ = zip(*points)
        ax.plot(xs, ys, marker="o", label=labels[name])
        for x, y, p in points:
            ax.annotate(str(p), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("latency per query, p50 ms (batch 1, 1 thread)")
    ax.set_ylabel("Recall@100 (test, leave-one-out)")
    ax.set_title("ml-100k: recall vs latency")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(out: Path, rows, table, curve, two_tower: RunDir, mfli_run: RunDir, total_s: float,
                  num_items: int, num_users: int, cold_users: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    versions = library_versions()
    payload = {
        "benchmark": "retrieval",
        "command": command(),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {k: versions.get(k) for k in ("torch", "torchrec", "ray", "faiss") if versions.get(k)},
        "rows": rows,
    }
    try:
        import faiss

        payload["versions"]["faiss"] = faiss.__version__
    except ImportError:
        pass
    (out / "retrieval.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(curve, out / "retrieval_curve.png")

    cols = ["recall@10", "recall@50", "recall@100", "ndcg@10", "top100_overlap_vs_own_exact", "items_scored",
            "p50_ms_b1", "p99_ms_b1", "p50_ms_b256", "cold_recall@50", "top1pct_share@10"]
    lines = ["| system | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, metrics in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in cols) + " |")
    curve_lines = ["| system | knob | latency p50 ms (batch 1) | recall@100 |", "|---|---|---|---|"]
    knob = {"mfli": "beam", "faiss_ivf": "nprobe", "faiss_hnsw": "efSearch"}
    for name, points in curve.items():
        for x, y, p in points:
            curve_lines.append(f"| {name} | {knob[name]}={p} | {x:.3f} | {y:.4f} |")
    m = payload["machine"]
    md = f"""# Retrieval benchmark: MFLI vs exact vs FAISS (issue 4)

Command: `{payload['command']}`, {total_s / 60:.1f} min end to end, commit `{payload['git_commit']}`,
{payload['date']}. Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU, shared
(1-minute load average {m['load_average_1m']} when the run ended: latencies are noisy); torch {versions.get('torch')},
torchrec {versions.get('torchrec')}, ray {versions.get('ray')}. Machine-readable: `retrieval.json`.

Runs (trained by this command on 2 Ray Train workers each, unless passed with `--*-run`): two-tower `configs/ml100k.yaml`
(`{two_tower.run_id}`), MFLI `configs/ml100k-mfli.yaml` (`{mfli_run.run_id}`: engagement +
semantic facets, each an L=3 x K=64 residual codebook co-trained with the item embeddings).

Test split of ml-100k: {num_users} users, leave-one-out by time, full ranking over {num_items}
items, seen (train + valid) items masked. `mfli` is beam search over the codes (beam
{DEFAULT_BEAM} of 64 level-0 codes per facet, items under the kept codes scored exactly);
`mfli_exact` is brute force over the same MFLI embeddings; FAISS indexes are built over the
two-tower embeddings (IVF-Flat nlist 64 nprobe {DEFAULT_NPROBE}, HNSW M 32 efSearch
{DEFAULT_EF}). `top100_overlap_vs_own_exact` is the share of the model's own exact top-100 found;
`items_scored` is (user, item) scores per query (HNSW does not report it); latencies are per
`search` call on one thread, FAISS's including its over-fetch for the seen-item mask; the
curve's points are timed in 10 interleaved rounds, so that a shared machine's slow minutes fall
on all of them alike. `cold_recall@50` is over the {cold_users} test users whose target has < 5 train + valid
interactions; `top1pct_share@10` is the share of top-10 slots held by the 1% most popular items.

## Results (ml-100k, test)

{chr(10).join(lines)}

Cold items through the real-time path: the cold test targets were removed from the MFLI index
and added back from their content alone (the run's exported content encoder: semantic facet as
trained, engagement facet over a zero id row), as brand-new items would be:
MFLI cold_recall@50 = {_fmt(table['mfli'].get('cold_added_recall@50'))} (vs
{_fmt(table['mfli'].get('cold_recall@50'))} with their trained entries). A two-tower item has
no such path (its id row must be trained).

## Recall–latency

![recall vs latency](retrieval_curve.png)

{chr(10).join(curve_lines)}

## Not measured

- The 1,000,000-item synthetic catalogue is a separate run, `make bench-synth1m`
  (about 40 min): see `retrieval_synth1m.md`.
- On a catalogue of 1,682 items the per-call overhead of the Python lookup dominates: the
  latency columns compare implementations, not asymptotic cost (see `items_scored`).
"""
    (out / "retrieval.md").write_text(md)


def command() -> str:
    """The command that made these numbers (``make bench-retrieval`` when run without flags)."""
    flags = " ".join(sys.argv[1:])
    return f"python benchmarks/bench_retrieval.py {flags}" if flags else "make bench-retrieval"


def _fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.4g}"


if __name__ == "__main__":
    raise SystemExit(main())
