"""HSNN tree balance: the greedy residual code against a capacity-capped one, on the same runs.

Why its own benchmark: the tree is built once, after training, from the run's final codebooks
and item vectors (``train_hsnn.build_index``), and serving's default beam search scores a node
by the item module at the mean of its items (``item_mean``), which reads no node module. So
rebuilding the tree of a finished run with ``max_leaf_ratio`` set is exactly what training with
``model.max_leaf_ratio`` would export, and every setting is measured on the same vectors and the
same scorer: only the assignment of items to leaves differs (issue #28: at 1M the greedy tree's
five largest leaves held 46-49k items each).

Per run and setting: the largest leaf over the mean leaf (items / leaves) and over the mean
non-empty leaf, the empty-leaf share, and at each beam Recall@10, NDCG@10, Recall@100, the
share of the exhaustive MoNN top-100 found (``top100_overlap_vs_own_exact``) and items scored.
Rows are mean ± standard error over the runs (seeds).

    python benchmarks/hsnn_balance.py --runs runs/ml100k-hsnn-s42 runs/ml100k-hsnn-s43 runs/ml100k-hsnn-s44

Writes ``docs/benchmarks/hsnn_balance.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import results  # noqa: E402  (benchmarks/results.py)
from bench_hsnn import hsnn_test_set  # noqa: E402
from results import mean_se, pm  # noqa: E402

from training.eval.retrieval_bench import Popularity, score_retriever, top_k_all  # noqa: E402
from training.eval.run_eval import PopularityRetriever  # noqa: E402
from training.index.hsnn_index import HSNNIndex  # noqa: E402
from training.models.hsnn_tree import HSNNTree  # noqa: E402
from training.runs import RunDir  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@50", "recall@100", "cold_recall@50", "top1pct_share@10",
           "top100_overlap_vs_own_exact", "items_scored")
KS = [10, 50, 100]


def leaf_stats(tree: HSNNTree) -> dict[str, float]:
    """Largest leaf against the mean leaf (items / K^L) and the mean non-empty leaf."""
    sizes = tree.node_sizes(tree.levels - 1).double()
    filled = sizes[sizes > 0]
    return {"max_leaf": float(sizes.max()), "max_over_mean": float(sizes.max() / sizes.mean()),
            "max_over_mean_nonempty": float(sizes.max() / filled.mean()),
            "empty_leaf_share": float((sizes == 0).double().mean())}  # fmt: skip


def rebuilt(index: HSNNIndex, ratio: float | None) -> HSNNIndex:
    """The same run's index with its tree re-coded greedily (None) or capped at ``ratio``."""
    tree = HSNNTree.build(index.tree.codebooks, index.tree.item_ids, index.item_vectors, ratio)
    return HSNNIndex(index.scorer, tree, index.item_vectors, index.history_keys, index.beam, index.node_scoring)


def measure_run(run: Path, ratios: list[float | None], beams: list[int], users: int | None) -> list[dict]:
    """Per setting and beam: leaf stats and quality on the same test users; plus a popularity row
    (``max_leaf_ratio`` "popularity") so the top-1% share and cold recall have their floor."""
    index = HSNNIndex.load(run / "index" / "hsnn")
    data = hsnn_test_set(run)
    data = data.sample(users, 0) if users else data
    popularity = Popularity.from_run(RunDir(run))
    exact = top_k_all(index.with_beam(None), data, max(KS))[0]  # the tree does not change the exhaustive answer
    pop, _ = score_retriever(PopularityRetriever(popularity.item_ids, popularity.counts), data, popularity, KS, exact)
    out = [{"run": run.name, "max_leaf_ratio": "popularity", "beam": 0, **{k: float(pop.get(k, 0.0)) for k in METRICS}}]
    for ratio in ratios:
        t0 = time.perf_counter()
        variant = rebuilt(index, ratio)
        build_s = time.perf_counter() - t0
        for beam in beams:
            m, _ = score_retriever(variant.with_beam(beam), data, popularity, KS, exact)
            out.append({"run": run.name, "max_leaf_ratio": ratio, "beam": beam, "build_s": build_s,
                        **leaf_stats(variant.tree), **{k: float(m.get(k, 0.0)) for k in METRICS}})  # fmt: skip
            print(f"{run.name} ratio {ratio} beam {beam}: leaf max/mean {out[-1]['max_over_mean']:.1f}, "
                  f"overlap {m['top100_overlap_vs_own_exact']:.3f}, recall@10 {m['recall@10']:.4f}, "
                  f"cold recall@50 {m.get('cold_recall@50', 0):.4f}, items scored {m['items_scored']:.0f}", flush=True)
    return out


def summarise(per_run: list[dict], dataset: str) -> tuple[list[dict], list[dict]]:
    """Mean ± SE per (setting, beam) over the runs, in the order measured, and the spec's rows."""
    table, rows = [], []
    for ratio, beam in dict.fromkeys((m["max_leaf_ratio"], m["beam"]) for m in per_run):
        here = [m for m in per_run if m["max_leaf_ratio"] == ratio and m["beam"] == beam]
        system = "popularity" if ratio == "popularity" else "hsnn_beam"
        knobs = {} if system == "popularity" else {"max_leaf_ratio": ratio, "beam": beam}
        summary = {"max_leaf_ratio": ratio, "beam": beam, "runs": len(here)}
        for key in ("max_over_mean", "max_over_mean_nonempty", "empty_leaf_share", *METRICS):
            if key not in here[0]:
                continue
            mean, se = mean_se([m[key] for m in here])
            summary[key] = (mean, se)
            rows.append(results.row(system, dataset, key, round(mean, 6), seeds=len(here), stat="mean",
                                    se=None if se is None else round(se, 6), **knobs))  # fmt: skip
        table.append(summary)
    return table, rows


def markdown(table: list[dict], paired: list[dict], dataset: str, users: str, command: str, machine: dict, date: str,
             commit: str | None, total_s: float, name: str) -> str:  # fmt: skip
    def cell(s: dict, key: str, digits: int = 3) -> str:
        return pm(s.get(key), digits)

    lines = [
        f"# HSNN tree balance: greedy vs capacity-capped leaves ({dataset})",
        "",
        f"Command: `{command}`; commit `{commit}`; {date}; {machine.get('cpu', '')}, load average at start "
        f"{machine.get('load_average_at_start', '')}; {total_s:.0f} s. Figures in `{name}.json`.",
        "",
        "Each run's tree is rebuilt from its final codebooks and item vectors, greedily (`max_leaf_ratio` none, what "
        "training exported until now) or with every node capped at the ratio times its level's mean size "
        "(`rq.capacity_encode`: items past a full node's capacity go to their next-nearest sibling; the cap is "
        "rounded up, so the largest leaf may pass ratio x mean by less than one item). Same vectors, same scorer, "
        f"nodes scored `item_mean`; {users}, seen items masked. Cold: test targets with fewer than 5 training "
        "interactions. Top-1% share: the share of top-10 slots given to the 1% most popular items. Mean ± standard "
        "error over the runs (seeds).",
        "",
        "| max_leaf_ratio | beam | largest leaf / mean leaf | / mean non-empty leaf | empty leaves | Recall@10 | NDCG@10 "
        "| Recall@50 | Recall@100 | cold Recall@50 | top-1% share of top-10 | top-100 overlap vs exhaustive | items scored |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in table:
        setting = "none (greedy)" if s["max_leaf_ratio"] is None else s["max_leaf_ratio"]
        lines.append(f"| {setting} | {s['beam'] or '–'} | {cell(s, 'max_over_mean', 1)} | {cell(s, 'max_over_mean_nonempty', 1)} | "
                     f"{cell(s, 'empty_leaf_share', 2)} | {cell(s, 'recall@10', 4)} | {cell(s, 'ndcg@10', 4)} | "
                     f"{cell(s, 'recall@50')} | {cell(s, 'recall@100')} | {cell(s, 'cold_recall@50', 4)} | "
                     f"{cell(s, 'top1pct_share@10')} | {cell(s, 'top100_overlap_vs_own_exact')} | {cell(s, 'items_scored', 0)} |")  # fmt: skip
    lines += ["", "Paired against the greedy tree of the same run and beam (mean ± standard error of the per-run difference):", "",
              "| max_leaf_ratio | beam | top-100 overlap change | Recall@10 change | NDCG@10 change | items scored change |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for d in paired:
        lines.append(f"| {d['max_leaf_ratio']} | {d['beam']} | {pm(d['top100_overlap_vs_own_exact'], 3, True)} | "
                     f"{pm(d['recall@10'], 4, True)} | {pm(d['ndcg@10'], 4, True)} | {pm(d['items_scored'], 0, True)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def paired_with_greedy(per_run: list[dict]) -> list[dict]:
    """Per capped setting and beam: the per-run change against the greedy tree, mean ± SE."""
    greedy = {(m["run"], m["beam"]): m for m in per_run if m["max_leaf_ratio"] is None}
    out = []
    for ratio, beam in dict.fromkeys((m["max_leaf_ratio"], m["beam"]) for m in per_run):
        if ratio in (None, "popularity"):
            continue
        here = [m for m in per_run if m["max_leaf_ratio"] == ratio and m["beam"] == beam and (m["run"], beam) in greedy]
        if here:
            out.append({"max_leaf_ratio": ratio, "beam": beam} | {
                key: mean_se([m[key] - greedy[(m["run"], beam)][key] for m in here])
                for key in ("top100_overlap_vs_own_exact", "recall@10", "ndcg@10", "items_scored")})  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished HSNN runs, one per seed")
    parser.add_argument("--ratios", nargs="+", default=["none", "4", "2"], help="max_leaf_ratio values ('none': greedy)")
    parser.add_argument("--beams", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--users", type=int, default=None, help="test users sampled per run (default: all)")
    parser.add_argument("--dataset", default="ml-100k", help="the dataset's name in the rows")
    parser.add_argument("--name", default="hsnn_balance", help="output file stem in --out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    ratios = [None if r == "none" else float(r) for r in args.ratios]
    torch.set_num_threads(1)
    t_start, machine = time.perf_counter(), results.machine()
    per_run = [m for run in args.runs for m in measure_run(run.resolve(), ratios, args.beams, args.users)]
    table, rows = summarise(per_run, args.dataset)
    command = (f"python benchmarks/hsnn_balance.py --runs {' '.join(str(r) for r in args.runs)} "
               f"--ratios {' '.join(args.ratios)} --beams {' '.join(map(str, args.beams))}"
               + (f" --users {args.users}" if args.users else "")
               + (f" --dataset {args.dataset} --name {args.name}" if args.name != "hsnn_balance" else ""))  # fmt: skip
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    payload = {"benchmark": "hsnn", "command": command, "git_commit": results.git_commit(), "date": date,
               "machine": machine, "versions": results.versions({"torch": "torch"}), "per_run": per_run, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    total = time.perf_counter() - t_start
    users = f"{args.users} sampled test users per run" if args.users else "all test users"
    paired = paired_with_greedy(per_run)
    payload["paired_with_greedy"] = paired
    (args.out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(table, paired, args.dataset, users, command, machine, date, payload["git_commit"], total, args.name)
    (args.out / f"{args.name}.md").write_text(text)
    print(f"wrote {args.out / args.name}.md in {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
