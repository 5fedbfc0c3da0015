"""The report of ``bench_learned_vs_faiss.py``: rows for ``retrieval_same_vectors{suffix}.json``, one
markdown section and one plot per learned index (``suffix``: ``Scale.suffix``, empty for ml-100k).

A run of one index (``--only mfli|hsnn``) replaces only that index's rows and section: the JSON
rows are told apart by ``params.vectors``, the markdown sections by ``<!-- part KIND -->``
markers, so three HSNN seeds can be measured without re-measuring MFLI.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_retrieval import machine
from benchmarks.results import mean_se
from benchmarks.learned_vs_faiss_points import OVERLAP, SCALES, Point, Scale, frontier_at
from training.runs import git_commit, library_versions

def plot(name: str, points: list[Point], path: Path, title: str) -> None:
    """Overlap and Recall@100 against p50 latency, at batch 1 and 256: one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(23, 9))
    curves: dict[str, list[Point]] = {}
    for p in points:
        curves.setdefault(p.curve, []).append(p)
    for (row, metric), (col, cost) in [(rm, cc) for rm in enumerate((OVERLAP, "recall@100")) for cc in enumerate(("p50_ms_b1", "p50_ms_b256", "cpu_ms_b256", "items_scored"))]:
        ax = axes[row][col]
        for label, members in curves.items():
            learned = not label.startswith("faiss")
            xs = [max(p.metrics[cost], 1.0) if cost == "items_scored" else p.metrics[cost] for p in members]
            ys = [p.metrics[metric] for p in members]
            style = dict(lw=2.5, color="black", marker="s", zorder=5) if learned else dict(lw=1, marker="o", ms=3,
                                                                                              ls="--" if "rerank" in label else "-")
            ax.plot(xs, ys, label=label, **style)
        ax.set_xscale("log")
        batch = cost.rsplit("_b", 1)[-1]
        ax.set_xlabel("items scored per query (FAISS: its distance count)" if cost == "items_scored"
                      else f"p50 CPU ms per search call (thread time), batch {batch}" if cost.startswith("cpu")
                      else f"p50 ms per search call (wall), batch {batch}, 1 thread")
        ax.set_ylabel(metric + (" (vs own exact)" if metric == OVERLAP else " (test)"))
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rows_of(points: list[Point], dataset: str) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        for metric in ("recall@10", "recall@100", OVERLAP):
            rows.append({"system": p.system, "dataset": dataset, "metric": metric, "value": round(p.metrics[metric], 6),
                         "params": {**p.params, "reference": p.reference, "curve": True}})
        for batch in (1, 256):
            rows.append({"system": p.system, "dataset": dataset, "metric": "latency_ms_p50",
                         "value": round(p.metrics[f"p50_ms_b{batch}"], 6),
                         "params": {**p.params, "threads": 1, "batch": batch, "curve": True}})
            rows.append({"system": p.system, "dataset": dataset, "metric": "cpu_ms_p50", "value": round(p.metrics[f"cpu_ms_b{batch}"], 6),
                         "params": {**p.params, "threads": 1, "batch": batch, "curve": True}})
        rows.append({"system": p.system, "dataset": dataset, "metric": "items_scored", "value": round(p.metrics["items_scored"], 2),
                     "params": {**p.params, "curve": True}})
    return rows


KINDS = ("mfli", "hsnn")


def write(out: Path, results: dict[str, dict[str, Any]], total_s: float, scale: Scale) -> None:
    """Write ``retrieval_same_vectors{suffix}.{json,md}`` and the plots of the indexes in ``results``;
    an index not measured in this run keeps its rows and section from the files on disk."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"retrieval_same_vectors{scale.suffix}"
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    old_md = md_path.read_text() if md_path.exists() else ""
    versions = library_versions()
    import faiss

    run_info = {"command": command(), "git_commit": git_commit(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                "minutes": round(total_s / 60, 1)}  # fmt: skip
    rows = [r for r in old.get("rows", []) if r.get("params", {}).get("vectors") not in results]
    parts = {k: v for k, v in old.get("parts", {}).items() if k not in results}
    for kind, res in results.items():
        rows += rows_of(res["points"], scale.dataset) + seed_rows(kind, res, scale.dataset)
        parts[kind] = run_info
        plot(kind, res["points"], out / f"{stem}_{kind}.png",
             f"{kind.upper()} vs FAISS on {kind.upper()}'s own vectors ({scale.dataset}, {res['n_items']:,} items; black: {kind})")
    payload = {"benchmark": "retrieval", **run_info,
               "versions": {**{k: versions.get(k) for k in ("torch", "torchrec", "ray") if versions.get(k)}, "faiss": faiss.__version__},
               "parts": parts, "rows": rows}  # fmt: skip
    sections = {kind: section(kind, res, run_info, stem) for kind, res in results.items()}
    for kind in KINDS:
        if kind not in sections and (kept := old_section(old_md, kind)):
            sections[kind] = kept
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    n_items = next(iter(results.values()))["n_items"]
    md_path.write_text(markdown(payload, [sections[k] for k in KINDS if k in sections], scale, n_items, stem))


def seed_rows(kind: str, res: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """Mean and standard error over the runs of each default-point system."""
    rows = []
    for name, per_seed in res["seeds"].items():
        for metric in per_seed[0]:
            mean, se = mean_se([s[metric] for s in per_seed])
            params = {"vectors": kind, "seeds": len(per_seed), "runs": res["runs"], "stat": "mean"}
            rows.append({"system": name, "dataset": dataset, "metric": metric, "value": round(mean, 6), "params": params})
            rows.append({"system": name, "dataset": dataset, "metric": metric, "value": None if se is None else round(se, 6),
                         "params": {**params, "stat": "se"}, **({"note": "one seed"} if se is None else {})})  # fmt: skip
    return rows


def old_section(md: str, kind: str) -> str | None:
    """``kind``'s section of an earlier report: between its part markers, or (a report written
    before the markers) from its ``## MFLI``/``## HSNN`` heading to the next ``## ``."""
    marked = re.search(rf"<!-- part {kind}: begin -->\n.*?<!-- part {kind}: end -->\n", md, re.S)
    if marked:
        return marked.group(0)
    plain = re.search(rf"^## {kind.upper()} .*?(?=^## )", md, re.S | re.M)
    return f"<!-- part {kind}: begin -->\n{plain.group(0).rstrip()}\n\n<!-- part {kind}: end -->\n" if plain else None


def _f(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _ms(v: float) -> str:
    return f"{v:.3g}"


def markdown(payload: dict[str, Any], sections: list[str], scale: Scale, n_items: int, stem: str) -> str:
    """The report: what is compared and how, then each learned index's section (with the command,
    commit, date and load it was measured with)."""
    m = payload["machine"]
    default_users = SCALES[scale.dataset].users
    users = (f"a seeded sample of {default_users:,} test users unless a section's command passes `--users`"
             if default_users else "every test user")
    lines = [
        f"# Learned indexes vs FAISS on the same vectors ({scale.dataset}, issue 27)",
        "",
        f"Last command: `{payload['command']}`, {payload['minutes']} min, commit `{payload['git_commit']}`, {payload['date']}. "
        f"Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, "
        f"no GPU; faiss {payload['versions']['faiss']}, torch {payload['versions'].get('torch')}. Machine-readable: "
        f"`{stem}.json` (benchmark `retrieval`; `parts` gives each index's command, commit, date and load). "
        "`--only mfli|hsnn` re-measures one index and keeps the other's section.",
        "",
        "Every FAISS index here holds **the item vectors the learned index scores** and is queried with the same user "
        "vector (`vectors` param); every system is judged against **its own exact top-100**: "
        "`top100_overlap_vs_own_exact` is the share of that top-100 a system returns (the same top-100 for MFLI and for "
        "FAISS on MFLI's vectors; for HSNN the exhaustive MoNN, for FAISS alone on HSNN's dot term the exact dot-term "
        f"top-100). `recall@10` / `recall@100` are test recall ({users}, leave-one-out, full ranking over {n_items:,} items, "
        "seen items masked inside every search). Latency is the p50 of one `search` call on one thread (torch and FAISS), at batch 1 "
        "and batch 256 users, every point of both learned indexes' sweeps timed in interleaved rounds in one process "
        "(a shared machine's slow minutes fall on every point alike; compare within this run only). `cpu_ms_p50` is the "
        "p50 of the CPU time the calling thread spent in the same calls: every system runs on that one thread, so it is "
        "the call's cost without the time other processes held the core, the steadier figure on this shared machine "
        "(a batch-256 call spans several scheduler slices, and its wall time follows the load).",
        "",
        "FAISS kinds (`training/retrieval/faiss_retriever.py`): `faiss_ivf` IndexIVFFlat over a flat k-means quantizer "
        f"(nlist {list(scale.ivf_nlists)}, nprobe swept up to {scale.max_nprobe} or nlist); `faiss_ivf_rq` IndexIVFFlat over a "
        f"ResidualCoarseQuantizer (`index_factory(\"IVF<n>(RCQ<L>x<b>),Flat\")`, L x b in {[f'{l}x{b}' for l, b in scale.rcq]}, "
        f"i.e. {' and '.join(f'{2 ** (l * b):,}' for l, b in scale.rcq)} lists that are residual code paths, as MFLI's posting "
        f"lists are; nprobe swept); `faiss_hnsw` IndexHNSWFlat (M {list(scale.hnsw_ms)}, efSearch {list(scale.hnsw_efs)}; FAISS "
        "searches with max(efSearch, k), so efSearch < 100 acts as 100). "
        "All inner product. Seen items are masked inside FAISS's search with a per-query IDSelector.",
        "",
    ]
    lines += sections
    lines += not_measured(scale)
    return "\n".join(lines)


def not_measured(scale: Scale) -> list[str]:
    if scale.dataset != "ml-100k":
        return ["## Not measured here", "",
                "- One run per learned index unless more are passed: the curves and the verdicts are on the first run.",
                "- HSNN at this size (`--only hsnn --hsnn-runs <configs/synth1m-hsnn.yaml runs>`) unless its section is above: "
                "its exhaustive MoNN reference costs a full MoNN pass over the catalogue per user.", ""]
    return [
        "## Not measured here",
        "",
        "- The 1,000,000-item catalogue: `--dataset synth-1m` (`retrieval_same_vectors_synth1m.md`, MFLI there; HSNN at "
        "that size not yet). The index comparison on 1,682 items is dominated by per-call overhead (below); at 1M, scoring "
        "items is the cost.",
        "- Latency on 1,682 items measures per-call overhead more than search cost: every point of the sweep scores "
        "at most 1,682 items, and a Python-level lookup (MFLI's, HSNN's) pays a fixed cost per call that FAISS's C++ "
        "does not.",
        "",
    ]


def section(kind: str, res: dict[str, Any], run_info: dict[str, Any], stem: str) -> str:
    """``kind``'s markdown section between its part markers."""
    title = {"mfli": "MFLI (vectors = MFLI's concatenated facet vectors)",
             "hsnn": "HSNN (vectors = the MoNN's item-level dot-product term)"}[kind]
    m = run_info["machine"]
    lines = [f"<!-- part {kind}: begin -->", f"## {title}", "",
             f"Measured by `{run_info['command']}` ({run_info['minutes']} min, commit `{run_info['git_commit']}`, "
             f"{run_info['date']}, 1-minute load {m['load_average_1m']} at the end). "
             f"Runs: {', '.join(f'`{r}`' for r in res['runs'])} (curves: the first). "
             f"Test users: {len(res['points'][0].data.user_ids):,}.", ""]
    if kind == "hsnn":
        lines += [
            "The MoNN score is `u·t + MLP(u, t) + attention(history, t)` with `t` the item vector after the item "
            "level's scale and bias; no inner-product index can hold it. FAISS therefore indexes `t` and is queried "
            "with `u` (the largest part of the score that is an inner product), and is shown two ways: alone, "
            "judged against the exact dot-term top-100 (an index judged as an index), and with its candidates "
            "re-ranked by the MoNN (`rerank=monn`, `fetch` candidates per user), judged against the exhaustive MoNN "
            "top-100, the reference HSNN's beam search is judged against.",
            "",
        ]
    lines += [f"![{kind} vs faiss]({stem}_{kind}.png)", "",
              "### Verdict: overlap at equal latency", ""]
    for label, v, clock in (("FAISS alone", res["verdict"], "p50_ms"), ("FAISS alone, CPU time", res["verdict_cpu"], "cpu_ms"),
                            ("FAISS + MoNN re-rank", res["verdict_rerank"], "p50_ms"),
                            ("FAISS + MoNN re-rank, CPU time", res["verdict_rerank_cpu"], "cpu_ms")):
        if v is None:
            continue
        for batch in (1, 256):
            below = [e for e in v[batch] if not e["at_or_above"]]
            lines.append(f"- **{label}, batch {batch}**: {kind} is at or above FAISS's best overlap at no more latency "
                         f"at {len(v[batch]) - len(below)} of {len(v[batch])} beam widths"
                         + ("." if not below else "; below it at " + ", ".join(
                             f"{e['learned'].knob} ({_f(e['learned'].metrics[OVERLAP])} at {_ms(e['learned'].metrics[f'{clock}_b{batch}'])} ms vs "
                             f"{e['faiss'].curve} {e['faiss'].knob}: {_f(e['faiss'].metrics[OVERLAP])} at {_ms(e['faiss'].metrics[f'{clock}_b{batch}'])} ms)"
                             for e in below) + "."))
    below = [e for e in res["verdict_items"] if not e["at_or_above"]]
    lines.append(f"- **FAISS alone, at equal items scored per query** (a cost free of either implementation's per-call "
                 f"overhead): {kind} is at or above FAISS's best overlap at no more items scored at "
                 f"{len(res['verdict_items']) - len(below)} of {len(res['verdict_items'])} beam widths"
                 + ("." if not below else "; below it at " + ", ".join(
                     f"{e['learned'].knob} ({_f(e['learned'].metrics[OVERLAP])} with {e['learned'].metrics['items_scored']:.0f} items vs "
                     f"{e['faiss'].curve} {e['faiss'].knob}: {_f(e['faiss'].metrics[OVERLAP])} with {e['faiss'].metrics['items_scored']:.0f})"
                     for e in below) + "."))
    lines += ["", "### Why", "", why(kind, res)]
    lines += ["", "| learned point | overlap | recall@100 | p50 ms b1 | best FAISS at ≤ that latency (b1) | its overlap | its recall@100 | its p50 ms b1 |",
              "|---|---|---|---|---|---|---|---|"]
    for e in res["verdict"][1]:
        p, q = e["learned"], e["faiss"]
        lines.append(f"| {p.system} {p.knob} | {_f(p.metrics[OVERLAP])} | {_f(p.metrics['recall@100'])} | {_ms(p.metrics['p50_ms_b1'])} | "
                     + (f"{q.curve} {q.knob} | {_f(q.metrics[OVERLAP])} | {_f(q.metrics['recall@100'])} | {_ms(q.metrics['p50_ms_b1'])} |" if q else "none as fast | – | – | – |"))
    lines += ["", "### Quality over seeds (mean ± standard error)", "",
              f"Default points: {res['default'].system} {res['default'].knob}; the FAISS row is the point with the best "
              f"overlap at no more batch-1 latency than it on the first run"
              + (f" ({res['faiss_at_default'].curve} {res['faiss_at_default'].knob})" if res["faiss_at_default"] else "")
              + ", rebuilt on each run's vectors.", "",
              "| system | seeds | recall@10 | recall@100 | top100_overlap_vs_own_exact |", "|---|---|---|---|---|"]
    for name, per_seed in res["seeds"].items():
        cells = []
        for metric in ("recall@10", "recall@100", OVERLAP):
            if metric not in per_seed[0]:
                cells.append("–")
                continue
            mean, se = mean_se([s[metric] for s in per_seed])
            cells.append(f"{mean:.4f}" + (f" ± {se:.4f}" if se is not None else ""))
        lines.append(f"| {name} | {len(per_seed)} | " + " | ".join(cells) + " |")
    lines += ["", "### Every point", "", "| system | curve | knob | overlap | recall@10 | recall@100 | items scored | p50 ms b1 | p50 ms b256 | p50 CPU ms b1 | p50 CPU ms b256 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in res["points"]:
        mm = p.metrics
        lines.append(f"| {p.system} | {p.curve} | {p.knob} | {_f(mm[OVERLAP])} | {_f(mm['recall@10'])} | {_f(mm['recall@100'])} | "
                     f"{mm['items_scored']:.0f} | {_ms(mm['p50_ms_b1'])} | {_ms(mm['p50_ms_b256'])} | {_ms(mm['cpu_ms_b1'])} | {_ms(mm['cpu_ms_b256'])} |")
    lines += ["", f"<!-- part {kind}: end -->", ""]
    return "\n".join(lines)


def why(kind: str, res: dict[str, Any]) -> str:
    """What the curves show about the index itself, with this run's numbers."""
    learned, faiss_alone = res["learned"], res["faiss"]
    default = res["default"]
    cheapest_faiss = min(faiss_alone, key=lambda p: p.metrics["cpu_ms_b1"])
    cheapest_learned = min(learned, key=lambda p: p.metrics["cpu_ms_b1"])
    rival = frontier_at(faiss_alone, default.metrics["cpu_ms_b256"], "cpu_ms_b256")
    rival_text = (f"at batch 256 the best FAISS point within its CPU time ({_ms(default.metrics['cpu_ms_b256'])} ms per call) is "
                  f"{rival.curve} {rival.knob}, overlap {_f(rival.metrics[OVERLAP])} at {_ms(rival.metrics['cpu_ms_b256'])} ms"
                  if rival else "no FAISS point is as cheap at batch 256")
    if res["n_items"] > 100_000:
        return why_large(kind, res)
    if kind == "mfli":
        return (
            "MFLI at depth 1 is an inverted file: each facet's 64 level-0 codes are its lists, the beam is nprobe per facet, and "
            "the union over the two facets is scored exactly with the full vector, as IVF-Flat scores its probed lists. Its lists "
            "come from a residual codebook trained with the embeddings, and on these vectors they are not a better partition than "
            "FAISS's k-means or HNSW's graph: at equal items scored per query it finds about as much of its exact top-100 as they "
            "do, less at the narrowest beams. What puts it ahead at batch 1 is the cost of a call, not the index: its compiled "
            f"one-user lookup costs {_ms(cheapest_learned.metrics['cpu_ms_b1'])} ms of CPU ({cheapest_learned.knob}) where the "
            f"cheapest FAISS call (the search plus the Python wrapper's masking and conversions) costs "
            f"{_ms(cheapest_faiss.metrics['cpu_ms_b1'])} ms ({cheapest_faiss.curve} {cheapest_faiss.knob}), and on 1,682 items "
            "no point of any curve scores more than 1,682 items, so that fixed cost decides. At batch 256 the fixed "
            f"cost is shared and FAISS's per-user search is the cheaper: beam {default.params['beam']} costs "
            f"{_ms(default.metrics['cpu_ms_b256'])} ms per call for overlap {_f(default.metrics[OVERLAP])}, while {rival_text}."
        )
    rerank = [p for p in res["reranked"] if p.params.get("fetch") == 100 and p.params.get("nprobe") == p.params.get("nlist")]
    dot_share = f"{_f(rerank[0].metrics[OVERLAP])}" if rerank else "–"
    best_rr = max(res["reranked"], key=lambda p: p.metrics[OVERLAP]) if res["reranked"] else None
    return (
        "HSNN's tree on 1,682 items has 16 roots and 256 leaves of ~6.6 items. From beam 16 up every root is kept, so every "
        "leaf is scored by the MoNN (16 + 256 node scores per user) before the ~300 items under the kept leaves are: several "
        "hundred MoNN evaluations per user, against 100 for FAISS + re-rank (a ~0.1 ms dot-product search, then the MoNN on its "
        "100 candidates). Below beam 16 the reached leaves hold fewer than 100 unseen items for most users, who are searched "
        "again with a doubled beam (`_widen_short_rows`), which is why items scored and latency rise as the beam narrows. And "
        "the MoNN's top-100 is mostly its dot term's: the exact dot-term top-100 re-ranked by the MoNN holds "
        f"{dot_share} of the exhaustive MoNN top-100"
        + (f" (best re-ranked point: {best_rr.curve} {best_rr.knob}, {_f(best_rr.metrics[OVERLAP])} "
           f"at {_ms(best_rr.metrics['cpu_ms_b1'])} CPU ms per call at batch 1)" if best_rr else "")
        + f", so a MIPS index over the dot term is a strong candidate generator for it. HSNN's default beam "
        f"{default.params['beam']} finds {_f(default.metrics[OVERLAP])} at {_ms(default.metrics['cpu_ms_b1'])} CPU ms per call at "
        f"batch 1; {rival_text} (against the dot-term's own exact top-100). Whether the tree pays for itself where scoring "
        "the catalogue is the expense (1M items) was not measured against FAISS on the same vectors."
    )


def why_large(kind: str, res: dict[str, Any]) -> str:
    """The same reading on a large catalogue, where scoring items, not a call's fixed cost, is the expense."""
    default, faiss_alone, n = res["default"], res["faiss"], res["n_items"]
    items = default.metrics["items_scored"]
    by_cpu = frontier_at(faiss_alone, default.metrics["cpu_ms_b1"], "cpu_ms_b1")
    by_items = frontier_at(faiss_alone, items, "items_scored")
    hnsw = [p for p in faiss_alone if p.system == "faiss_hnsw"]
    best_hnsw = max(hnsw, key=lambda p: p.metrics[OVERLAP]) if hnsw else None

    def at(p: Point | None, what: str) -> str:
        if p is None:
            return f"no FAISS point is as cheap in {what}"
        return (f"{p.curve} {p.knob}: overlap {_f(p.metrics[OVERLAP])}, recall@100 {_f(p.metrics['recall@100'])}, "
                f"{p.metrics['items_scored']:,.0f} items scored, {_ms(p.metrics['cpu_ms_b1'])} CPU ms at batch 1")

    structure = (f"MFLI at depth {default.params.get('depth')} scores the items under the beam's best prefixes in each facet "
                 "(its residual codebooks are the lists), exactly, with the full vector, as IVF-Flat scores its probed lists"
                 if kind == "mfli" else "HSNN descends its tree with the MoNN and scores the items under the kept leaves")
    return (
        f"On {n:,} items scoring the catalogue is the expense, so items scored per query is the fair cost and the per-call "
        f"overhead that decides ml-100k matters little. {structure}. Its default beam {default.params['beam']} scores "
        f"{items:,.0f} items ({100 * items / n:.2f}% of the catalogue) for overlap {_f(default.metrics[OVERLAP])} at "
        f"{_ms(default.metrics['cpu_ms_b1'])} CPU ms per call at batch 1. The best FAISS point at no more CPU time: "
        f"{at(by_cpu, 'CPU time')}. The best at no more items scored: {at(by_items, 'items scored')}"
        + (f". HNSW counts its distance computations as items scored; its best point: {at(best_hnsw, '')}" if best_hnsw else "")
        + "."
    )


def command() -> str:
    flags = " ".join(sys.argv[1:])
    return f"python benchmarks/bench_learned_vs_faiss.py {flags}".strip()
