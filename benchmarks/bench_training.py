"""Training benchmarks (``make bench-training``), in parts (``--parts``; a part run alone
replaces only its own rows in training.json):

- ``throughput``: the two-tower's examples/s under Ray Train (``rayrec``) vs the same model, step
  and examples under plain ``torchrun`` with no Ray (``torchrec_plain``,
  benchmarks/plain_two_tower.py), 1 and 2 workers, each step's time split (data, forward incl.
  lookup, backward, optimizer);
- ``mpzch``: the per-call cost of the training-path MPZCH module at 100k, 1M and 10M rows with
  the same batches (benchmarks/mpzch_module_cost.py; ``mpzch_call_ms``: it must stay O(batch));
- ``insert``: the MPZCH insert kernel at 1 and 2 threads (identical tables), and rayrec's
  lookup vs fbgemm's readonly lookup on the same batches, with probes per id
  (benchmarks/mpzch_insert_threads.py);
- ``churn``: the two-tower trained over simulated days of a churning stream with TTL eviction
  on and off (stale rows, ids without a row, next-day Recall/NDCG;
  benchmarks/mpzch_churn_training.py);
- ``storage``: the same 2-worker run with its run folder and checkpoints on local disk vs an
  S3-compatible server (moto on loopback), in interleaved rounds.

``storage`` answers: what does putting ``runs_dir`` in object storage (what a multi-node cluster
needs, ``training.storage``) cost a run? Rows (``training`` names of
../shared/specs/benchmark-results.md): ``examples_per_s`` of the training loop and of the whole
run (wall clock, checkpoints and export included), params ``storage``: ``local`` / ``s3``, and
``overhead_ratio`` = s3 wall time / local wall time.

    python benchmarks/bench_training.py [--rounds 3] [--epochs 2]    (make bench-training)
    python benchmarks/bench_training.py --parts churn [--churn-seeds 0 1 2]

Running some parts replaces only those parts' rows in training.json (:func:`part_of`); the other
parts' rows, and the commit, date and machine they were measured on (``runs``), stay.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import git_commit, machine, row  # noqa: E402
from results import versions as _versions  # noqa: E402

OUT_DIR = ROOT / "docs" / "benchmarks"


def one_run(config: Path, data: Path, runs_dir: str, run_id: str, epochs: int) -> dict:
    from training.config import load_config
    from training.jobs.train_retrieval import run as train

    cfg = load_config(config, [f"data.path={data}", f"runs_dir={runs_dir}", f"train.epochs={epochs}"])
    t0 = time.perf_counter()
    run = train(cfg, run_id=run_id).pull()
    wall = time.perf_counter() - t0
    epochs_done = [m for m in run.read_metrics() if "examples_per_s" in m]
    examples = sum(m["examples_per_s"] * m["train_s"] for m in epochs_done)
    return {"wall_s": wall, "loop_examples_per_s": statistics.mean(m["examples_per_s"] for m in epochs_done),
            "wall_examples_per_s": examples / wall, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one local and one s3 run each)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (one checkpoint each)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml100k.yaml"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--churn-seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the churn part")
    parser.add_argument("--churn-days", type=int, default=5, help="simulated days trained in the churn part")
    parser.add_argument("--report-only", action="store_true", help="rebuild training.md (and its plots) from training.json")
    args = parser.parse_args()
    if args.report_only:
        payload = json.loads((OUT_DIR / "training.json").read_text())
        write_plots(payload["rows"])
        (OUT_DIR / "training.md").write_text(markdown(payload, args))
        return

    import ray

    from tests.s3_server import s3_server
    from training.data.movielens import prepare_ml100k

    data = ROOT / "data" / "ml-100k"
    if set(args.parts) - {"churn"}:
        prepare_ml100k(data)
    started = dt.datetime.now(dt.timezone.utc)
    box = machine()
    rows = mpzch_rows() if "mpzch" in args.parts else []
    rows += insert_rows() if "insert" in args.parts else []
    throughput: dict[tuple[str, int], list[dict]] = {}
    results: dict[str, list[dict]] = {"local": [], "s3": []}
    if "storage" not in args.parts:
        args.rounds = 0
    with s3_server() as _, tempfile.TemporaryDirectory() as tmp:
        if args.rounds or {"throughput", "churn"} & set(args.parts):
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        if "churn" in args.parts:
            from mpzch_churn_training import ChurnConfig, churn_rows

            rows += churn_rows(ChurnConfig(seeds=args.churn_seeds, days=args.churn_days), Path(tmp) / "churn")
        if "throughput" in args.parts:
            throughput = throughput_runs(Path(args.config), data, Path(tmp), args.epochs, rounds=2)
            rows += throughput_rows(throughput)
        for r in range(args.rounds):
            for storage in ("local", "s3") if r % 2 == 0 else ("s3", "local"):  # alternate who goes first
                runs_dir = f"{tmp}/runs" if storage == "local" else "s3://rayrec/bench/runs"
                measured = one_run(Path(args.config), data, runs_dir, f"bench-{storage}-{r}", args.epochs)
                results[storage].append(measured)
                print(f"round {r} {storage}: {measured['wall_s']:.1f}s wall, "
                      f"{measured['loop_examples_per_s']:.0f} ex/s in the loop", flush=True)
        if ray.is_initialized():
            ray.shutdown()

    for storage, runs in results.items():
        if not runs:
            continue
        for metric, key in (("examples_per_s", "loop_examples_per_s"), ("examples_per_s_wall", "wall_examples_per_s")):
            values = [m[key] for m in runs]
            rows.append(row("rayrec", "ml-100k", metric, statistics.median(values), workers=2, storage=storage,
                            stat="median", rounds=len(values), values=[round(v, 1) for v in values]))
    ratios = [s["wall_s"] / l["wall_s"] for s, l in zip(results["s3"], results["local"])]
    if ratios:
        rows.append(row("rayrec", "ml-100k", "overhead_ratio", statistics.median(ratios), workers=2,
                        storage="s3_vs_local", stat="median", per_round=[round(x, 3) for x in ratios],
                        what="wall time of the run with runs_dir on the S3-compatible server / on local disk"))
    payload = {
        "benchmark": "training",
        "command": "make bench-training",
        "git_commit": git_commit(),
        "date": started.isoformat(timespec="seconds"),
        "machine": box,
        "versions": _versions({"torch": "torch", "torchrec": "torchrec", "ray": "ray", "pyarrow": "pyarrow", "moto": "moto"}),
        "args": " ".join(sys.argv[1:]),
        "rows": rows,
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / "training.json"
    payload = merge_parts(json.loads(path.read_text()) if path.is_file() else None, payload, args.parts)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    write_plots(payload["rows"])
    (OUT_DIR / "training.md").write_text(markdown(payload, args))
    print(f"wrote {OUT_DIR / 'training.md'} and training.json")


PARTS = ("throughput", "mpzch", "insert", "storage", "churn")
INSERT_METRICS = {"insert_ids_per_s", "lookup_ids_per_s", "insert_scaling_2_vs_1", "machine_scaling_2_vs_1", "pair_scaling_2_vs_1"}
CHURN_IMAGE = "training_churn.png"


def part_of(r: dict) -> str:
    """Which ``--parts`` part measured a row (rows written before parts were recorded carry no tag)."""
    if r["dataset"] == "synth-churn":
        return "churn"
    if r["metric"] == "mpzch_call_ms":
        return "mpzch"
    if r["metric"] in INSERT_METRICS:
        return "insert"
    return "storage" if "storage" in r["params"] else "throughput"


def merge_parts(previous: dict | None, fresh: dict, parts: list[str]) -> dict:
    """``fresh`` plus the rows of ``previous`` from parts this run did not measure.

    ``runs`` records, per part, the commit, date, arguments and machine load it was measured
    with, so a report merged from several runs says where each section's numbers come from.
    """
    if previous is None:
        previous = {"rows": [], "runs": {}}
    stamp = {k: fresh[k] for k in ("git_commit", "date", "args")} | {"load_average_at_start": fresh["machine"]["load_average_at_start"]}
    old_stamp = {k: previous.get(k) for k in ("git_commit", "date", "args")} | {
        "load_average_at_start": previous.get("machine", {}).get("load_average_at_start")}
    runs = {part: previous.get("runs", {}).get(part, old_stamp) for part in {part_of(r) for r in previous["rows"]}}
    runs.update({part: stamp for part in parts})
    kept = [r for r in previous["rows"] if part_of(r) not in parts]
    return fresh | {"rows": kept + fresh["rows"], "runs": dict(sorted(runs.items()))}


def write_plots(rows: list[dict]) -> None:
    """The report's figures, from the rows alone (``--report-only`` redraws them)."""
    from mpzch_churn_training import DATASET, plot

    if any(r["dataset"] == DATASET for r in rows):
        plot(rows, OUT_DIR / CHURN_IMAGE)


def plain_run(config: Path, data: Path, workers: int, epochs: int, out: Path) -> dict:
    """The same loop under ``torchrun`` (benchmarks/plain_two_tower.py), no Ray."""
    import subprocess

    from tests.s3_server import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(workers), "--master_port",
           str(free_port()), str(ROOT / "benchmarks" / "plain_two_tower.py"), "--config", str(config),
           "--data", str(data), "--epochs", str(epochs), "--out", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return {"wall_s": time.perf_counter() - t0, "epochs": json.loads(out.read_text())["epochs"]}


def ray_run(config: Path, data: Path, runs_dir: Path, run_id: str, workers: int, epochs: int) -> dict:
    from training.config import load_config
    from training.jobs.train_retrieval import run as train

    cfg = load_config(config, [f"data.path={data}", f"runs_dir={runs_dir}", f"train.epochs={epochs}",
                               f"scaling.num_workers={workers}"])
    t0 = time.perf_counter()
    run = train(cfg, run_id=run_id)
    epochs_done = [m for m in run.read_metrics() if "examples_per_s" in m]
    return {"wall_s": time.perf_counter() - t0, "epochs": epochs_done}


def throughput_runs(config: Path, data: Path, tmp: Path, epochs: int, rounds: int) -> dict[tuple[str, int], list[dict]]:
    """``{(system, workers): [run, ...]}``, systems and worker counts interleaved in each round."""
    out: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for workers in (1, 2):
            order = ("rayrec", "torchrec_plain") if (r + workers) % 2 == 0 else ("torchrec_plain", "rayrec")
            for system in order:
                if system == "rayrec":
                    measured = ray_run(config, data, tmp / "tp-runs", f"tp-{workers}-{r}", workers, epochs)
                else:
                    measured = plain_run(config, data, workers, epochs, tmp / f"plain-{workers}-{r}.json")
                out.setdefault((system, workers), []).append(measured)
                rate = statistics.median(e["examples_per_s"] for e in measured["epochs"])
                print(f"round {r} {system} {workers} worker(s): {rate:.0f} examples/s", flush=True)
    return out


def throughput_rows(throughput: dict[tuple[str, int], list[dict]]) -> list[dict]:
    """examples/s (median over every epoch of every round), the time split, and the ratios."""
    from training.jobs.step_timing import PHASES

    out, rate = [], {}
    for (system, workers), runs in sorted(throughput.items()):
        epochs = [e for run in runs for e in run["epochs"]]
        rate[(system, workers)] = statistics.median(e["examples_per_s"] for e in epochs)
        out.append(row(system, "ml-100k", "examples_per_s", rate[(system, workers)], workers=workers, device="cpu",
                       stat="median over epochs", epochs=len(epochs), values=[round(e["examples_per_s"]) for e in epochs]))
        total = sum(sum(e[f"time_s/{p}"] for p in PHASES) for e in epochs)
        for phase in PHASES:
            share = sum(e[f"time_s/{phase}"] for e in epochs) / total
            out.append(row(system, "ml-100k", "step_time_share", share, workers=workers, phase=phase))
    for workers in (1, 2):
        if ("rayrec", workers) in rate and ("torchrec_plain", workers) in rate:
            out.append(row("rayrec", "ml-100k", "overhead_ratio", rate[("torchrec_plain", workers)] / rate[("rayrec", workers)],
                           workers=workers, what="torchrec_plain examples/s / rayrec (Ray Train) examples/s"))
    for system in ("rayrec", "torchrec_plain"):
        if (system, 1) in rate and (system, 2) in rate:
            out.append(row(system, "ml-100k", "scaling_2_vs_1", rate[(system, 2)] / rate[(system, 1)], workers=2))
    return out


def mpzch_rows(rounds: int = 3, batch: int = 4096, calls: int = 40, warmup: int = 5) -> list[dict]:
    """``mpzch_call_ms`` (module and kernel) at 100k / 1M / 10M rows, one thread, TTL eviction on,
    interleaved rounds (see benchmarks/mpzch_module_cost.py)."""
    import torch

    import embeddings.mpzch as mpzch
    from mpzch_module_cost import KernelTimer, batches, time_cell

    timer = KernelTimer(mpzch.zero_collision_hash_insert)
    mpzch.zero_collision_hash_insert = timer
    stream = batches(25_000, batch, warmup + calls, 0)
    sizes = [100_000, 1_000_000, 10_000_000]
    cells: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
    torch.set_num_threads(1)
    for _ in range(rounds):
        for n in sizes:
            cells[n].append(time_cell(n, "ttl", stream, warmup, timer))
    mpzch.zero_collision_hash_insert = timer.kernel
    out = []
    for n in sizes:
        module_ms = statistics.median(m for m, _ in cells[n])
        kernel_ms = statistics.median(k for _, k in cells[n])
        out.append(row("rayrec", "synthetic-ids", "mpzch_call_ms", module_ms, rows=n, batch=batch, part="module", threads=1, eviction="ttl"))
        out.append(row("rayrec", "synthetic-ids", "mpzch_call_ms", kernel_ms, rows=n, batch=batch, part="insert_kernel", threads=1, eviction="ttl"))
        print(f"mpzch {n:>11,} rows: module {module_ms:.3f} ms, kernel {kernel_ms:.3f} ms per call", flush=True)
    return out


def insert_rows(batches: tuple[int, ...] = (4096, 16_384, 65_536)) -> list[dict]:
    """``insert_ids_per_s`` at 1 and 2 threads at each batch size, and lookups (rayrec vs fbgemm
    readonly) on the same batches, with probes per id (benchmarks/mpzch_insert_threads.py)."""
    from mpzch_insert_threads import InsertBench, measure

    out = []
    for batch in batches:
        cfg = InsertBench(batch=batch)
        result = measure(cfg)
        rate, rounds = result["ids_per_s"], result["per_round"]
        common = {"rows": cfg.rows, "batch": cfg.batch, "buckets": cfg.buckets, "max_probe": cfg.max_probe,
                  "load": cfg.load, "present_share": cfg.present_share, "rounds": cfg.rounds, "stat": "median"}
        for threads in (1, 2):
            out.append(row("rayrec", "synthetic-ids", "insert_ids_per_s", rate[f"insert_t{threads}"], threads=threads,
                           mode="insert", per_round_m=rounds[f"insert_t{threads}"],
                           probes_per_id=round(result["probes_per_id"]["insert"], 2),
                           identical_to_1_thread=result["identical"], **common))
        for system, key in (("rayrec", "lookup_rayrec"), ("fbgemm_readonly", "lookup_fbgemm")):
            out.append(row(system, "synthetic-ids", "lookup_ids_per_s", rate[key], threads=1, mode="lookup",
                           per_round_m=rounds[key], probes_per_id=round(result["probes_per_id"]["lookup"], 2), **common))
        # paired within each round (the two cells ran back to back on the same machine state): a
        # round where the host took the second core shows as one low ratio, not as a shifted median
        paired = [t2 / t1 for t1, t2 in zip(rounds["insert_t1"], rounds["insert_t2"])]
        out.append(row("rayrec", "synthetic-ids", "insert_scaling_2_vs_1", statistics.median(paired),
                       per_round=[round(x, 2) for x in paired], identical_to_1_thread=result["identical"],
                       **{**common, "stat": "median of per-round ratios"}))
        out.append(row("torch_matmul", "synthetic", "machine_scaling_2_vs_1", rate["matmul_scaling"],
                       per_round=rounds["matmul_scaling"], what="1024x1024 matmul, 1 thread / 2 threads, same rounds",
                       **common))
        out.append(row("rayrec", "synthetic-ids", "pair_scaling_2_vs_1", rate["pair_ceiling"], per_round=rounds["pair_ceiling"],
                       what="two single-thread inserts in two processes, own tables, started together: summed ids/s "
                            "/ one thread alone (the ceiling for any threaded insert on this machine)", **common))  # fmt: skip
        print(f"batch {batch}: insert {rate['insert_t1'] / 1e6:.1f} M/s at 1 thread, {rate['insert_t2'] / 1e6:.1f} M/s "
              f"at 2 (identical: {result['identical']}); lookup rayrec {rate['lookup_rayrec'] / 1e6:.1f} M/s, "
              f"fbgemm {rate['lookup_fbgemm'] / 1e6:.1f} M/s; matmul 2/1 threads {rate['matmul_scaling']:.2f}x", flush=True)
    return out


def markdown(payload: dict, args: argparse.Namespace) -> str:
    """The report, from the JSON's rows alone (so ``--report-only`` rebuilds it from the JSON)."""
    m = payload["machine"]
    rows = payload["rows"]
    by_metric = lambda metric: [r for r in rows if r["metric"] == metric]  # noqa: E731
    lines = [
        "# Training throughput",
        "",
        f"`{payload['command']}` (`python benchmarks/bench_training.py {payload.get('args', '')}`), commit "
        f"`{payload['git_commit']}`, {payload['date']}; {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"load average {m['load_average_at_start']} at the start. The machine was shared with other jobs "
        "during the run: single figures move by up to 2x between rounds, so read the interleaved "
        "per-round values, not one number.",
        "",
    ]
    if len(payload.get("runs", {})) > 1:  # parts measured by different runs (``--parts``)
        lines += ["Each part's numbers come from its own run on this machine:", ""]
        lines += [f"- {part}: commit `{run['git_commit']}`, {run['date']}, `{run['args']}`, load average "
                  f"{run['load_average_at_start']} at the start" for part, run in payload["runs"].items()]
        lines.append("")
    rates = {(r["system"], r["params"]["workers"]): r for r in by_metric("examples_per_s") if "storage" not in r["params"]}
    if rates:
        shares = {(r["system"], r["params"]["workers"], r["params"]["phase"]): r["value"] for r in by_metric("step_time_share")}
        lines += [
            "## Ray Train against plain torchrun, 1 and 2 workers",
            "",
            "The two-tower on ml-100k (`configs/ml100k.yaml`, 2 epochs a run, 2 rounds, systems and worker "
            "counts interleaved). `rayrec`: `rayrec train` on Ray Train (Ray Data feeds the batches; "
            "evaluation and checkpoints happen between epochs, outside the loop's time). `torchrec_plain`: "
            "the same `build_trainable` / `train_step` over the same examples under `torchrun`, no Ray "
            "(benchmarks/plain_two_tower.py). examples/s is the training loop's, median over every epoch "
            "of every round; 1 thread per worker on 2 cores.",
            "",
            "| system | workers | examples/s (median) | each epoch | data | forward (incl. lookup) | backward | optimizer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for system, workers in sorted(rates):
            r = rates[(system, workers)]
            split = " | ".join(f"{shares[(system, workers, p)]:.0%}" for p in ("data", "forward", "backward", "optimizer"))
            lines.append(f"| {system} | {workers} | {r['value']:.0f} | {', '.join(str(v) for v in r['params']['values'])} | {split} |")
        lines.append("")
        for r in by_metric("overhead_ratio"):
            if "storage" not in r["params"]:
                lines.append(f"- plain examples/s / Ray Train examples/s at {r['params']['workers']} worker(s): "
                             f"**{r['value']}** (Ray Train {1 - 1 / r['value']:.1%} slower)")
        for r in by_metric("scaling_2_vs_1"):
            lines.append(f"- {r['system']}: 2 workers / 1 worker = {r['value']} (2 cores, shared)")
        lines += ["", "Where Ray Train's time goes beyond plain torchrun's: the `data` phase (pulling the "
                  "next batch from Ray Data's split iterator and building the KJT) against slicing an "
                  "in-memory table.", ""]
    calls = by_metric("mpzch_call_ms")
    if calls:
        lines += [
            "## MPZCH module cost per call against table size",
            "",
            "The training-path MPZCH module (TorchRec's input mapper, TTL eviction scoring, rayrec's "
            "insert kernel, the table counters) on the same 4,096-id batches at each size, one thread, "
            "median of 3 interleaved rounds of 40 calls (benchmarks/mpzch_module_cost.py). It must cost "
            "O(batch): 10M rows at most 2x 100k.",
            "",
            "| rows | module ms per call | of which the insert kernel |",
            "|---|---|---|",
        ]
        by = {(r["params"]["rows"], r["params"]["part"]): r["value"] for r in calls}
        for n in sorted({r["params"]["rows"] for r in calls}):
            lines.append(f"| {n:,} | {by[(n, 'module')]:.3f} | {by[(n, 'insert_kernel')]:.3f} |")
        lines += ["", f"10M / 100k: **{by[(10_000_000, 'module')] / by[(100_000, 'module')]:.2f}x**.", ""]
    inserts = by_metric("insert_ids_per_s") + by_metric("lookup_ids_per_s")
    if inserts:
        p = inserts[0]["params"]
        lines += [
            "## MPZCH insert on 1 and 2 threads, and insert against lookup like for like",
            "",
            f"rayrec's CPU kernel on a {p['rows']:,}-row table in {p['buckets']} TorchRec bucket windows "
            f"(local_sizes/offsets), filled to load {p['load']}; each batch {p['present_share']:.0%} present ids and "
            f"the rest new, max_probe {p['max_probe']}; median batch, median of {p['rounds']} interleaved rounds, "
            "each cell on a fresh copy of the table (benchmarks/mpzch_insert_threads.py). A lookup of an absent "
            "id walks its whole probe window; an insert stops at the first empty slot: the probes per id column "
            "says how much work each did. `machine 2/1`: a 1024 x 1024 torch matmul on 2 threads vs 1 in the "
            "same rounds, the machine's own 2-core scaling at the time. `two processes 2/1`: two single-thread "
            "inserts in two processes on their own tables, started together, summed ids/s over one thread alone "
            "in the same round: no shared row and no coordination, so the ceiling for any threaded insert.",
            "",
            "| batch | system | mode | threads | M ids/s (median) | each round | probes per id |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(inserts, key=lambda r: r["params"]["batch"]):
            q = r["params"]
            lines.append(f"| {q['batch']:,} | {r['system']} | {q['mode']} | {q['threads']} | {r['value'] / 1e6:.2f} | "
                         f"{', '.join(str(v) for v in q['per_round_m'])} | {q['probes_per_id']} |")
        lines += ["", "| batch | insert 2 threads / 1 (median of the rounds' ratios; each round) | two processes 2/1 (each round) | machine 2/1 (each round) | tables equal bit for bit |",
                  "|---|---|---|---|---|"]  # fmt: skip
        machine = {r["params"]["batch"]: r for r in by_metric("machine_scaling_2_vs_1")}
        pair = {r["params"]["batch"]: r for r in by_metric("pair_scaling_2_vs_1")}
        for r in sorted(by_metric("insert_scaling_2_vs_1"), key=lambda r: r["params"]["batch"]):
            m = machine[r["params"]["batch"]]
            pr = pair.get(r["params"]["batch"])
            pair_cell = f"{pr['value']:.2f}x ({', '.join(str(v) for v in pr['params']['per_round'])})" if pr else "n/a"
            per = r["params"].get("per_round")
            per_cell = f" ({', '.join(str(v) for v in per)})" if per else ""
            lines.append(f"| {r['params']['batch']:,} | **{r['value']:.2f}x**{per_cell} | {pair_cell} | {m['value']:.2f}x "
                         f"({', '.join(str(v) for v in m['params']['per_round'])}) | {r['params']['identical_to_1_thread']} |")
        lines.append("")
    from mpzch_churn_training import markdown_section as churn_section

    lines += churn_section(rows, CHURN_IMAGE)
    storage = [r for r in rows if "storage" in r["params"]]
    if storage:
        lines += [
            "## Run folder and checkpoints on local disk vs object storage",
            "",
            "The same 2-worker two-tower run (2 epochs, one sharded checkpoint per epoch, then the index "
            "export), one local Ray. `local`: `runs_dir` a folder on this disk. `s3`: `runs_dir=s3://…` on "
            "moto's S3 server on loopback, so every checkpoint, metrics line and export goes through "
            "`pyarrow.fs` and HTTP. Runs alternate (local/s3, then s3/local).",
            "",
            "| storage | loop examples/s (each round) | whole-run examples/s incl. checkpoints and export (each round) |",
            "|---|---|---|",
        ]
        for name in ("local", "s3"):
            loop = next(r for r in storage if r["metric"] == "examples_per_s" and r["params"]["storage"] == name)
            wall = next(r for r in storage if r["metric"] == "examples_per_s_wall" and r["params"]["storage"] == name)
            lines.append(f"| {name} | {', '.join(f'{v:.0f}' for v in loop['params']['values'])} | "
                         f"{', '.join(f'{v:.0f}' for v in wall['params']['values'])} |")
        ratio = next(r for r in storage if r["metric"] == "overhead_ratio")
        lines += ["", f"s3 wall time / local wall time, median of rounds: **{ratio['value']}** "
                  f"(per round {ratio['params']['per_round']}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
