"""A/B of a learned index's lookup (MFLI or HSNN): this working tree's
``training/index/<kind>_index.py`` against the same file at a git revision, on one trained run's
index, timed in the same interleaved rounds.

Why a benchmark of its own: lookup changes move tens of microseconds, while this shared
machine's drift moves absolute timings between two benchmark runs by up to 2x (FAISS IVF at
nprobe 1 took 0.25 ms in one ``make bench-synth1m`` and 0.49 ms in the next). Timing both
versions in the same rounds (``retrieval_bench.interleaved_latency``) on the same users makes
their ratio trustworthy. Both must return the same items for every user (checked), so only
speed is compared.

    python benchmarks/ab_lookup.py --index mfli --base 8831973 --run runs/bench-synth1m-mfli-s18
    python benchmarks/ab_lookup.py --index hsnn --base a647c92 --run runs/ml100k-hsnn-s42 --batches 1 256

Writes ``docs/benchmarks/<kind>_lookup_ab.md`` and ``.json`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import results  # noqa: E402  (benchmarks/results.py: machine, versions, commit, row)

from training.eval.retrieval_bench import interleaved_latency  # noqa: E402
from training.eval.run_eval import load_test_set  # noqa: E402
from training.index.hsnn_index import HSNNIndex, with_user_packs  # noqa: E402
from training.index.mfli_index import MFLIIndex  # noqa: E402
from training.runs import RunDir  # noqa: E402

INDEXES = {"mfli": ("training/index/mfli_index.py", MFLIIndex), "hsnn": ("training/index/hsnn_index.py", HSNNIndex)}
"""kind -> (the module compared, its index class, whose ``load(run.index_dir / kind)`` reads it)."""


def module_at(rev: str, module: str, scratch: Path) -> ModuleType:
    """``module`` (a path in the repo) as it was at ``rev``, imported under another name (its
    own imports resolve against the working tree)."""
    source = subprocess.run(["git", "show", f"{rev}:{module}"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    name = Path(module).stem + "_base"
    path = scratch / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def same_results(a, b) -> bool:
    """The same items with the same scores (1e-5), in the same order except among items whose
    scores tie to float precision: summing a dot product in another order (SIMD lanes against
    BLAS) may swap two items whose scores differ in the 7th digit, or tie exactly."""
    if set(a.item_ids.flatten().tolist()) != set(b.item_ids.flatten().tolist()):
        return False
    if not torch.allclose(a.scores, b.scores, atol=1e-5, rtol=1e-5):
        return False
    differ = a.item_ids != b.item_ids
    return bool(torch.allclose(a.scores[differ], b.scores[differ], atol=1e-6, rtol=0) if differ.any() else True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", choices=sorted(INDEXES), default="mfli", help="which learned index's lookup")
    parser.add_argument("--base", required=True, help="git revision whose index module is the baseline")
    parser.add_argument("--run", required=True, type=Path, help="a run folder of that kind (its index is loaded twice)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="users per search call")
    parser.add_argument("--beams", type=int, nargs="+", default=[4, 32, 256], help="beam widths to compare")
    parser.add_argument("--users", type=int, default=300, help="test users timed (and checked for equal results)")
    parser.add_argument("--calls", type=int, default=1500, help="timed calls per (version, beam)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks")
    args = parser.parse_args()
    t_start = time.perf_counter()
    start_machine = results.machine()
    run = RunDir(args.run.resolve())
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
    kind, (module, cls) = args.index, INDEXES[args.index]
    data = load_test_set(run).sample(args.users, args.seed)
    if kind == "hsnn":  # HSNN's user embedding is the packed (vector, history rows)
        data = with_user_packs(run.index_dir, data)
    dataset = Path(json.loads((run.index_dir / "index.json").read_text())["dataset"]).name
    with tempfile.TemporaryDirectory() as scratch:
        base_module = module_at(args.base, module, Path(scratch))
        indexes = {
            kind: cls.load(run.index_dir / kind),
            f"{kind}_base": getattr(base_module, cls.__name__).load(run.index_dir / kind),
        }
    num_items = indexes[kind].num_items if kind == "hsnn" else len(indexes[kind])
    print(f"{num_items} items, {len(data.user_ids)} users; base {base_rev}", flush=True)

    torch.set_num_threads(1)
    for beam in args.beams:  # the same items for every user, or the timing means nothing
        for index in indexes.values():
            index.beam = beam
        for i in range(len(data.user_ids)):
            users, exclude = data.user_emb[i : i + 1], [data.exclude[i]]
            got = [index.search(users, args.k, exclude=exclude) for index in indexes.values()]
            if not same_results(*got):
                raise SystemExit(f"beam {beam}, user {int(data.user_ids[i])}: the two versions return different items")

    def setter(system: str, beam: int):
        def setup():
            indexes[system].beam = beam
            return indexes[system]

        return setup

    rows, table = [], []
    for batch in args.batches:
        calls = args.calls if batch == 1 else max(10, args.calls // batch * 4)
        points = [((system, beam), setter(system, beam), data) for beam in args.beams for system in indexes]
        timings = interleaved_latency(points, calls, k=args.k, batch=batch)
        for beam in args.beams:
            new, base = timings[(kind, beam)], timings[(f"{kind}_base", beam)]
            ratio = new["latency_ms_p50"] / base["latency_ms_p50"]
            cpu_ratio = new["cpu_ms_p50"] / base["cpu_ms_p50"]
            table.append((batch, beam, base["latency_ms_p50"], new["latency_ms_p50"], ratio, cpu_ratio, base["latency_ms_p99"], new["latency_ms_p99"]))
            for system, t in ((kind, new), (f"{kind}_base", base)):
                for metric in ("latency_ms_p50", "latency_ms_p99", "cpu_ms_p50"):
                    rows.append(results.row(system, dataset, metric, t[metric], beam=beam, threads=1, batch=batch,
                                            rev=base_rev if system.endswith("_base") else "working tree"))
            rows.append(results.row(kind, dataset, "latency_ratio_vs_base_p50", ratio, beam=beam, batch=batch, base=base_rev))
            rows.append(results.row(kind, dataset, "cpu_ratio_vs_base_p50", cpu_ratio, beam=beam, batch=batch, base=base_rev))
            print(f"batch {batch} beam {beam}: base p50 {base['latency_ms_p50']:.3f} ms, working tree "
                  f"{new['latency_ms_p50']:.3f} ms, ratio {ratio:.3f} (CPU {cpu_ratio:.3f})", flush=True)

    command = (f"python benchmarks/ab_lookup.py --index {kind} --base {args.base} --run {args.run} "
               f"--beams {' '.join(map(str, args.beams))} --batches {' '.join(map(str, args.batches))}")
    payload = {
        "benchmark": f"{kind}_lookup_ab",
        "command": command,
        "git_commit": results.git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": start_machine,
        "versions": results.versions({"torch": "torch", "numpy": "numpy"}),
        "base": base_rev,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{kind}_lookup_ab.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# {kind.upper()} lookup: working tree against a base revision (A/B)",
        "",
        f"Command: `{command}`, {(time.perf_counter() - t_start) / 60:.1f} min, commit `{payload['git_commit']}`, "
        f"{payload['date']}. Machine: {start_machine.get('cpu')}, {start_machine.get('cores')} cores "
        f"(load average {start_machine['load_average_at_start']} at the start). "
        f"Machine-readable: `{kind}_lookup_ab.json`.",
        "",
        f"Index: `{args.run}` ({dataset}, {num_items:,} items), the same files loaded by both versions. "
        f"{len(data.user_ids)} test users, seen items excluded, k = {args.k}, one thread; "
        f"{args.calls} timed calls per row at batch 1 in 10 interleaved rounds (fewer at larger batches). Both versions returned the same "
        "items with the same scores for every user at every beam, in the same order up to float ties "
        "(checked before timing).",
        "",
        f"| users per call | beam | base `{base_rev}` p50 ms | working tree p50 ms | ratio (p50) | ratio (CPU p50) | base p99 ms | working tree p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {n} | {b} | {bp50:.3f} | {np50:.3f} | {r:.3f} | {c:.3f} | {bp99:.3f} | {np99:.3f} |" for n, b, bp50, np50, r, c, bp99, np99 in table],
        "",
        "Absolute times drift with the shared machine's load; read the ratio.",
        "",
    ]
    (args.out / f"{kind}_lookup_ab.md").write_text("\n".join(lines))
    print(f"wrote {args.out / f'{kind}_lookup_ab.md'} and .json", flush=True)


if __name__ == "__main__":
    main()
