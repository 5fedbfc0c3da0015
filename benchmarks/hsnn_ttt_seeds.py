"""HSNN test-time training over seeds: Recall@10 / NDCG@10 with and without TTT on the same users,
at a beam where the node filter selects and at the serving beam, with TTT's cost per query.

Why its own benchmark: ``bench_hsnn.py`` measures TTT on one run at the serving beam (64), where
every one of the 16 roots is kept, so "the examples under the visited nodes" is the whole pool
and TTT reduces to fine-tuning on the nearest users (issue #28). Here each run is scored at
``--beams`` (default 4: the level-0 filter keeps 4 of 16 roots, a quarter of the pool; and 64),
with and without TTT, on the same sampled test users, and the paired difference is reported as
mean ± standard error over the runs (seeds). TTT's settings are each run's ``ttt`` config.

    python benchmarks/hsnn_ttt_seeds.py --runs runs/ml100k-hsnn-s42 runs/ml100k-hsnn-s43 runs/ml100k-hsnn-s44

Writes ``docs/benchmarks/hsnn_ttt.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import results  # noqa: E402  (benchmarks/results.py)
from results import mean_se, pm  # noqa: E402
from bench_hsnn import hsnn_test_set, score  # noqa: E402

from training.index.hsnn_index import HSNNIndex  # noqa: E402
from training.models.hsnn_ttt import TTTConfig, TTTPool, TTTRetriever  # noqa: E402

METRICS = ("recall@10", "ndcg@10", "recall@100")


def measure_run(run: Path, beams: list[int], users: int, seed: int) -> list[dict]:
    """Per beam: the metrics without and with TTT on the same users, TTT ms per query and the
    share of the pool under the visited nodes (1.0: the filter selects nothing)."""
    index = HSNNIndex.load(run / "index" / "hsnn")
    pool = TTTPool.load(run / "index" / "hsnn")
    cfg = TTTConfig(**(yaml.safe_load((run / "config.yaml").read_text()).get("ttt") or {}))
    sample = hsnn_test_set(run).sample(users, seed)
    out = []
    for beam in beams:
        plain = index.with_beam(beam)
        before = score(plain, sample, chunk=1)
        ttt = TTTRetriever(plain, pool, cfg)
        with torch.no_grad():  # the share of the pool the level's visited nodes hold, per user
            state = plain.user_state(sample.user_emb)
            _, visited, _ = plain.descend(state, beam)
        level_nodes = visited[ttt.level]
        under = torch.stack([torch.isin(ttt.pool_nodes, row[row >= 0]).float().mean() for row in level_nodes])
        after = score(ttt, sample, chunk=1)
        out.append({"run": run.name, "beam": beam, "users": int(before["users"]), "level": ttt.level,
                    "pool_share_under_visited": float(under.mean()),
                    "before": {m: before[m] for m in METRICS} | {"ms_per_query": before["ms_per_query_batched"]},
                    "after": {m: after[m] for m in METRICS} | {"ms_per_query": after["ms_per_query_batched"]},
                    "ttt_ms_per_query": 1000 * ttt.seconds / max(after["users"], 1),
                    "examples": cfg.examples, "steps": cfg.steps, "lr": cfg.lr})  # fmt: skip
        print(f"{run.name} beam {beam}: recall@10 {before['recall@10']:.4f} -> {after['recall@10']:.4f}, "
              f"ndcg@10 {before['ndcg@10']:.4f} -> {after['ndcg@10']:.4f}, pool share {out[-1]['pool_share_under_visited']:.2f}, "
              f"TTT {out[-1]['ttt_ms_per_query']:.0f} ms/query", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="finished configs/ml100k-hsnn.yaml runs, one per seed")
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--users", type=int, default=300, help="test users sampled per run (the same for both arms)")
    parser.add_argument("--seed", type=int, default=0, help="user sample seed")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t_start, machine = time.perf_counter(), results.machine()
    per_run = [m for run in args.runs for m in measure_run(run.resolve(), args.beams, args.users, args.seed)]

    rows, table = [], []
    for beam in args.beams:
        here = [m for m in per_run if m["beam"] == beam]
        summary = {"beam": beam, "runs": len(here), "pool_share": mean_se([m["pool_share_under_visited"] for m in here])[0],
                   "ttt_ms": mean_se([m["ttt_ms_per_query"] for m in here])[0],
                   "ms_before": mean_se([m["before"]["ms_per_query"] for m in here])[0],
                   "ms_after": mean_se([m["after"]["ms_per_query"] for m in here])[0]}  # fmt: skip
        for metric in METRICS:
            for arm in ("before", "after"):
                mean, se = mean_se([m[arm][metric] for m in here])
                system = "hsnn_beam_ttt" if arm == "after" else "hsnn_beam"
                summary[f"{arm}/{metric}"] = (mean, se)
                rows.append(results.row(system, "ml-100k", metric, round(mean, 6), beam=beam, seeds=len(here), stat="mean"))
                rows.append(results.row(system, "ml-100k", metric, None if se is None else round(se, 6), "one run",
                                        beam=beam, seeds=len(here), stat="se"))
            mean, se = mean_se([m["after"][metric] - m["before"][metric] for m in here])
            summary[f"diff/{metric}"] = (mean, se)
            rows.append(results.row("hsnn_beam_ttt", "ml-100k", f"{metric}_gain_vs_no_ttt", round(mean, 6), beam=beam,
                                    seeds=len(here), stat="mean", se=None if se is None else round(se, 6)))
        rows.append(results.row("hsnn_beam_ttt", "ml-100k", "ttt_ms_per_query", round(summary["ttt_ms"], 3), beam=beam, threads=1, batch=1))
        rows.append(results.row("hsnn_beam_ttt", "ml-100k", "pool_share_under_visited", round(summary["pool_share"], 4), beam=beam))
        table.append(summary)

    command = "python benchmarks/hsnn_ttt_seeds.py --runs " + " ".join(str(r) for r in args.runs) + \
        f" --beams {' '.join(map(str, args.beams))} --users {args.users}"
    payload = {"benchmark": "hsnn", "command": command, "git_commit": results.git_commit(),
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": machine,
               "versions": results.versions({"torch": "torch"}), "per_run": per_run, "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hsnn_ttt.json").write_text(json.dumps(payload, indent=2) + "\n")

    def gain(pair: tuple[float, float | None] | None) -> str:
        return pm(pair, 4, sign=True)

    def ms(pair: tuple[float, float | None]) -> str:
        return pm(pair, 4)

    lines = [
        "# HSNN test-time training over seeds (ml-100k)",
        "",
        f"Command: `{command}`, {(time.perf_counter() - t_start) / 60:.1f} min, commit `{payload['git_commit']}`, "
        f"{payload['date']}. Machine: {machine.get('cpu')}, {machine.get('cores')} cores (load average "
        f"{machine['load_average_at_start']} at the start). Machine-readable: `hsnn_ttt.json`.",
        "",
        f"Each run's test users sampled ({args.users}, seed {args.seed}; the same users with and without TTT), one "
        "request at a time (batch 1, 1 thread), seen items masked, full catalogue. TTT: per request, the pool "
        "examples under the nodes the beam keeps at the first level, the nearest to the user by user vector, a few "
        "Adam steps on a copy of the scorer, then the same beam search with it (`training/models/hsnn_ttt.py`; "
        "examples/steps/lr from each run's `ttt` config). Gains are paired per run, then mean ± standard error "
        "over the runs (seeds).",
        "",
        "| beam | runs | pool share under the visited nodes | Recall@10 without | with TTT | gain | NDCG@10 without | with TTT | gain | Recall@100 gain | ms/query without | with | of which fine-tuning |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in table:
        lines.append(
            f"| {s['beam']} | {s['runs']} | {s['pool_share']:.2f} | {ms(s['before/recall@10'])} | {ms(s['after/recall@10'])} | "
            f"{gain(s['diff/recall@10'])} | {ms(s['before/ndcg@10'])} | {ms(s['after/ndcg@10'])} | {gain(s['diff/ndcg@10'])} | "
            f"{gain(s['diff/recall@100'])} | {s['ms_before']:.1f} | {s['ms_after']:.1f} | {s['ttt_ms']:.1f} |"
        )
    lines += ["", "Per run:", "", "| run | beam | Recall@10 without → with | NDCG@10 without → with | pool share | TTT ms/query |",
              "|---|---|---|---|---|---|"]
    for m in per_run:
        lines.append(f"| {m['run']} | {m['beam']} | {m['before']['recall@10']:.4f} → {m['after']['recall@10']:.4f} | "
                     f"{m['before']['ndcg@10']:.4f} → {m['after']['ndcg@10']:.4f} | {m['pool_share_under_visited']:.2f} | "
                     f"{m['ttt_ms_per_query']:.0f} |")
    lines.append("")
    (args.out / "hsnn_ttt.md").write_text("\n".join(lines))
    print(f"wrote {args.out / 'hsnn_ttt.md'} and .json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
