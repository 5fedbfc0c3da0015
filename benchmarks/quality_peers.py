"""The peers of issue #31: RecBole 1.2.1 models trained and tested on rayrec's own ml-100k split.

    python benchmarks/quality_peers.py --split-dir data/ml-100k/interactions --seeds 0 1 2 \
        --models SASRec BPR Pop ItemKNN NeuMF LightGCN
    python benchmarks/quality_peers.py --split-dir data/ml-100k/interactions --seeds 0 1 2 --reuse

The split files (``{train,valid,test}.parquet``: leave-one-out by time, ties broken by item_id)
become RecBole atomic files, read in RecBole's pre-split benchmark mode so RecBole trains on the
same train rows and scores the same held-out item per user, ranking all items with seen items
masked (train on valid; train + valid on test, as ``training/export.py``'s ``seen.parquet``).
Each peer is RecBole's defaults plus early stopping on valid NDCG@10 (``recbole_runner.CONFIG``).

RecBole runs in its own virtual environment, ``.venv-recbole`` in the repository root (made on
first use by :func:`ensure_venv`), called through ``benchmarks/recbole_runner.py`` one
(model, seed) at a time, so rayrec's own environment never imports it.

``--reuse`` (or ``peer_rows(..., reuse=True)``) builds the rows from the runs stored in
``docs/benchmarks/quality_peers_ml100k.json`` instead of training; a fresh run adds its runs to
that file. Rows are ``quality`` rows of ``/work/shared/specs/benchmark-results.md``: one per
(system, metric, stat), ``stat`` ``mean`` or ``se`` (std / sqrt(n), ddof=1) over ``seeds``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import results

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-recbole"
RUNNER = Path(__file__).resolve().parent / "recbole_runner.py"
STORED = ROOT / "docs" / "benchmarks" / "quality_peers_ml100k.json"
DATASET = "rayrec-ml-100k"  # not "ml-100k": RecBole would add its own ml-100k.yaml settings
SPLITS = ("train", "valid", "test")
MODELS = ("SASRec", "BPR", "Pop", "ItemKNN", "NeuMF", "LightGCN")  # SASRec (the one to beat) first
METRICS = ("recall@10", "ndcg@10", "recall@50")
MAX_HISTORY = 50  # RecBole's MAX_ITEM_LIST_LENGTH default: the last 50 items feed a sequential model

# RecBole 1.2.1 and what it needs to work today, each pin with its reason:
VENV_PACKAGES = [
    "torch==2.13.0",  # the local CPU wheel (anything else may pull a CUDA build)
    "recbole==1.2.1",
    "numpy==1.23.5",  # RecBole 1.2.1 uses np.float/np.int/np.bool aliases removed in numpy 1.24
    "scipy==1.10.1",  # the last scipy built for numpy 1.23 (newer ones need numpy >= 1.25)
    "pandas==1.5.3",  # RecBole's loaders predate pandas 2 (and pandas 2 needs a newer numpy)
]


# ----------------------------------------------------------------------------- atomic files

def _sorted_split(split_dir: Path, split: str):
    """One split file as a DataFrame in rayrec's order: user, then (timestamp, item_id)."""
    df = pq.read_table(split_dir / f"{split}.parquet").to_pandas()
    return df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)


def write_atomic(split_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the split as RecBole atomic files; return ``{"plain": path, "seq": path}``.

    ``plain/DATASET/DATASET.{split}.inter``: one row per interaction (user, item, rating, timestamp).
    ``seq/DATASET/DATASET.{split}.inter``: one row per target with ``item_id_list``, the user's
    last <= 50 items before it in time order: every train row but a user's first, the valid row
    after all train rows, the test row after all train + valid rows (what rayrec's eval feeds).
    """
    split_dir, out_dir = Path(split_dir), Path(out_dir)
    frames = {s: _sorted_split(split_dir, s) for s in SPLITS}
    plain, seq = out_dir / "plain" / DATASET, out_dir / "seq" / DATASET
    plain.mkdir(parents=True, exist_ok=True)
    seq.mkdir(parents=True, exist_ok=True)

    history: dict[int, list[int]] = {}  # user -> items so far, in time order
    for split in SPLITS:
        df = frames[split]
        with open(plain / f"{DATASET}.{split}.inter", "w") as f:
            f.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
            for u, i, r, t in zip(df.user_id, df.item_id, df.rating, df.timestamp):
                f.write(f"{u}\t{i}\t{r:g}\t{t}\n")
        with open(seq / f"{DATASET}.{split}.inter", "w") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\titem_id_list:token_seq\n")
            for u, i, t in zip(df.user_id, df.item_id, df.timestamp):
                before = history.setdefault(int(u), [])
                if before:  # RecBole cannot read an empty history; only a user's first item has none
                    f.write(f"{u}\t{i}\t{t}\t{' '.join(map(str, before[-MAX_HISTORY:]))}\n")
                elif split != "train":
                    raise ValueError(f"user {u} has no history before its {split} item")
                before.append(int(i))
    return {"plain": out_dir / "plain", "seq": out_dir / "seq"}


def read_atomic(path: str | Path):
    """An atomic ``.inter`` file as a DataFrame with the type suffixes dropped from its columns."""
    import pandas as pd

    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


# ----------------------------------------------------------------------------- RecBole's venv

def ensure_venv(venv: Path = VENV) -> Path:
    """The RecBole venv's python, creating the venv (``python3 -m venv`` + pip) when missing."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import recbole, torch; assert recbole.__version__ == '1.2.1'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [VENV_PACKAGES[0]], check=True)  # torch alone first: the CPU wheel
    subprocess.run(pip + VENV_PACKAGES, check=True)
    subprocess.run(probe, check=True)
    return python


def run_peer(model: str, seed: int, atomic: dict[str, Path], workdir: Path,
             time_cap_min: float | None = None) -> dict:
    """Train and test one RecBole ``model`` with ``seed``; the runner's result dict.

    ``time_cap_min`` (default none) stops training early; the result then says ``converged: false``.
    """
    python = ensure_venv()
    sequential = model in ("SASRec",)  # the only sequential model of issue #31's table
    cmd = [str(python), str(RUNNER), "--data-path", str(atomic["seq" if sequential else "plain"]),
           "--plain-path", str(atomic["plain"]), "--dataset", DATASET, "--model", model,
           "--seed", str(seed), "--checkpoint-dir", str(workdir / "ckpt" / f"{model}-{seed}")]
    if time_cap_min is not None:
        cmd += ["--time-cap-min", str(time_cap_min)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{model} seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- rows

def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return mean, se


def rows_from_runs(runs: list[dict], seeds: list[int], models=MODELS, notes: dict | None = None) -> list[dict]:
    """``quality`` rows (mean and se of each metric) from runner results, for ``seeds`` only."""
    out = []
    for model in models:
        mine = {r["seed"]: r for r in runs if r["model"] == model and r["seed"] in seeds}
        used = sorted(mine)
        missing = (notes or {}).get(model) or (f"not run for seeds {sorted(set(seeds) - set(used))}"
                                              if not used else None)
        extra = {}
        if used:  # how far training went: False when a time cap stopped any seed first
            extra = {"converged": all(mine[s].get("converged", True) for s in used),
                     "best_epoch": [mine[s]["best_epoch"] for s in used],
                     "epochs_run": [mine[s]["epochs_run"] for s in used],
                     "wall_s": [mine[s]["wall_s"] for s in used]}
        for metric in METRICS:
            mean, se = _mean_se([mine[s]["test"][metric] for s in used])
            for stat, value in (("mean", mean), ("se", se)):
                note = missing if not used else "one seed: no standard error" if value is None else None
                out.append(results.row(model.lower(), "ml-100k", metric, value, note, stat=stat, seeds=used,
                                       **extra))
    return out


def load_stored(path: Path = STORED) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.exists() else []


def store(runs: list[dict], notes: dict, path: Path = STORED) -> None:
    """Merge ``runs`` into the stored file (a newer run of the same model and seed replaces one).

    Locked, so drivers running side by side (say, SASRec in one and the rest in another) can share it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _store_locked(runs, notes, path)


def _store_locked(runs: list[dict], notes: dict, path: Path) -> None:
    previous = json.loads(path.read_text()) if path.exists() else {}
    notes = {**previous.get("notes", {}), **notes}
    kept = {(r["model"], r["seed"]): r for r in previous.get("runs", [])}
    kept.update({(r["model"], r["seed"]): r for r in runs})
    seeds = sorted({r["seed"] for r in kept.values()})
    doc = {
        "benchmark": "quality",
        "command": "python benchmarks/quality_peers.py --split-dir data/ml-100k/interactions --seeds "
                   + " ".join(map(str, seeds)),
        "git_commit": results.git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": results.machine(),
        "versions": {"recbole": "1.2.1", **{p.split("==")[0]: p.split("==")[1] for p in VENV_PACKAGES}},
        "protocol": __doc__.split("\n\n")[2].replace("\n", " "),
        "notes": notes,
        "runs": sorted(kept.values(), key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99,
                                                      r["seed"])),
    }
    doc["rows"] = rows_from_runs(doc["runs"], seeds, notes=notes)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def peer_rows(split_dir: str, seeds: list[int], models=MODELS, reuse: bool = False,
              deadline: float | None = None, jobs: int = 1, time_cap_min: float | None = None) -> list[dict]:
    """Mean and se rows of every peer in ``models`` over ``seeds`` on ``split_dir``'s split.

    ``reuse``: rows from the stored runs (``STORED``), training nothing. Otherwise every (model,
    seed) is trained, in ``models`` order, ``jobs`` at a time (one torch thread each), and stored
    as it finishes; a run that would start after ``deadline`` (``time.time()``) is skipped and
    its model's rows say so.
    """
    if reuse:
        doc = json.loads(STORED.read_text())
        return rows_from_runs(doc["runs"], seeds, models, doc.get("notes"))
    runs, notes, lock = [], {}, threading.Lock()

    def one(model: str, seed: int, atomic: dict[str, Path], tmp: Path) -> None:
        if deadline is not None and time.time() > deadline:
            with lock:
                notes[model] = f"seed {seed} not run: the run's time budget was spent"
            return
        result = run_peer(model, seed, atomic, tmp, time_cap_min)
        print(f"{model} seed {seed}: {result['test']} epochs {result['epochs_run']} "
              f"(best {result['best_epoch']}) {result['wall_s']} s", file=sys.stderr, flush=True)
        with lock:
            runs.append(result)
            store([result], notes)

    with tempfile.TemporaryDirectory(prefix="recbole-") as tmp:
        atomic = write_atomic(split_dir, tmp)
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(one, m, s, atomic, Path(tmp)) for m in models for s in seeds]
            for future in futures:
                future.result()
    return rows_from_runs(runs, seeds, models, notes)


def table(rows: list[dict]) -> str:
    """Markdown table: one line per system, ``mean ± se`` per metric."""
    cell = {(r["system"], r["metric"], r["params"]["stat"]): r["value"] for r in rows}
    params = {r["system"]: r["params"] for r in rows}
    notes = {r["system"]: r.get("note") for r in rows}
    lines = ["| peer | " + " | ".join(METRICS) + " | seeds | best epoch / epochs run | wall s per seed |",
             "|---" * (len(METRICS) + 4) + "|"]
    for system in dict.fromkeys(r["system"] for r in rows):
        parts = []
        for m in METRICS:
            mean, se = cell[(system, m, "mean")], cell[(system, m, "se")]
            parts.append("—" if mean is None else f"{mean:.3f}" + ("" if se is None else f" ± {se:.3f}"))
        p = params[system]
        epochs = ", ".join(f"{b}/{e}" for b, e in zip(p.get("best_epoch", []), p.get("epochs_run", [])))
        if p.get("seeds") and not p.get("converged", True):
            epochs += " (time cap: not converged)"
        wall = ", ".join(f"{w:.0f}" for w in p.get("wall_s", [])) or (notes[system] or "")
        lines.append(f"| {system} | " + " | ".join(parts) + f" | {p['seeds']} | {epochs} | {wall} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split-dir", default=str(ROOT / "data" / "ml-100k" / "interactions"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="RecBole model names")
    parser.add_argument("--reuse", action="store_true", help=f"rows from {STORED.relative_to(ROOT)}, no training")
    parser.add_argument("--budget-min", type=float, help="start no run after this many minutes")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one torch thread each)")
    parser.add_argument("--time-cap-min", type=float,
                        help="stop each run's training after this many minutes (default none: early stopping only)")
    parser.add_argument("--out", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    deadline = time.time() + 60 * args.budget_min if args.budget_min else None
    rows = peer_rows(args.split_dir, args.seeds, args.models, reuse=args.reuse, deadline=deadline,
                     jobs=args.jobs, time_cap_min=args.time_cap_min)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
