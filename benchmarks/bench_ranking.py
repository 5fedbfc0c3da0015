"""Ranking benchmark: the MTML ranker, MBD debiasing, the value model and the FM.

Run: ``.venv/bin/python benchmarks/bench_ranking.py`` (``make bench-ranking``); 344 s
measured on 2 cores at load average 1.5 (6 epochs per dataset). Writes
``docs/benchmarks/ranking.md``, ``ranking.json`` (format: ``/work/shared/specs/benchmark-results.md``)
and ``ranking_*.png``; ``--render`` rebuilds the Markdown from the JSON alone.

How: each dataset's config (``configs/synth-ranker.yaml``, ``configs/ml100k-ranker.yaml``)
trains with the real job (2 Ray Train workers, row-wise MPZCH tables, FM trained jointly with
uniform FM dropout) on a capped number of examples (``BenchConfig``); the exported serving
artifact (``runs/<id>/ranker/``) is then loaded unsharded and scored in-process on the held-out
evaluation lists, which are rebuilt from the same seed. So every number comes from the model
serving would load.

Measured:

1. per task: AUC (torchmetrics), NE and calibration (torchrec's formulas: predicted/actual);
   NDCG@10 of the value ordering per list;
2. MBD (synthetic data, planted bias = item length): Pearson correlation of the value score with
   log item length for raw / z-score / percentile transforms; Kendall τ with the generator's
   ``true_pref`` per user list; share of each list's top-10 that changes when the value weights
   change (raw vs debiased); and, over 3 seeds, MBD against per-cohort normalisation on the same
   inputs with planted and misspecified cohorts (``benchmarks/mbd_baselines.py``; ``--parts mbd``
   runs that part alone and merges its rows into the existing report);
3. FM: AUC with no FM (hit rate 0), FM at hit rates 25/50/75/90% (the exact expectation over
   which rows have their FM) and always (oracle);
4. FLOPs (``torch.utils.flop_counter``) and latency per 1,000 candidates, one thread: ranker
   alone vs ranker + synchronous FM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config
from training.data.ranking_examples import build_ranking_data, label_arrays
from training.jobs.train_ranker import (
    RankerRunConfig,
    outputs_from_scores,
    task_metrics,
    top_k_churn,
    value_metrics,
)  # fmt: skip
from training.models.mbd import standardize
from training.models.ranker_artifact import load_ranker
from training.models.ranker_scoring import score_table
from training.models.value import ValueModel
from training.runs import git_commit, library_versions

from ranking_report import (  # noqa: E402  (benchmarks/ranking_report.py: the Markdown, notes and plots)
    HIT_RATES,
    OUT_DIR,
    SERVING_BATCH,
    SYSTEM_OF_TRANSFORM,
    machine as _machine,
    markdown,
    plot,
    setup_text,
)

COMMAND = ".venv/bin/python benchmarks/bench_ranking.py"


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark (kept small so it runs in minutes on 2 shared cores).

    Args:
        synth: generator sizes of ``data/synth-ranker`` (users, items, interactions).
        max_train_rows: training examples per dataset (a seeded sample).
        epochs: passes over them (at 2 the FM had not yet learned the synthetic session term).
        max_eval_groups: evaluation lists (users) per dataset.
        reweight: the second set of value weights for the churn measurement.
        latency_repeats: timed forward passes per setting.
    """

    synth: tuple[int, int, int] = (3_000, 2_000, 120_000)
    max_train_rows: int = 40_000
    epochs: int = 6
    max_eval_groups: int = 600
    reweight: dict[str, float] = field(default_factory=lambda: {"watch_time": 0.3, "loop": 2.0, "comment": 2.0, "like": 0.3, "rated": 2.0, "rating": 2.0})
    latency_repeats: int = 15


def _row(system: str, dataset: str, metric: str, value: float | None, **params) -> dict[str, Any]:
    row = {"system": system, "dataset": dataset, "metric": metric,
           "value": None if value is None or not np.isfinite(value) else round(float(value), 5), "params": params}  # fmt: skip
    if row["value"] is None:
        row["note"] = "not measurable on this dataset"
    return row


# ---------------------------------------------------------------- data and training
def prepare_data(cfg: BenchConfig) -> dict[str, Path]:
    from training.data.movielens import prepare_ml100k
    from training.data.synth import generate_synth

    users, items, interactions = cfg.synth
    synth = ROOT / "data" / "synth-ranker"
    generate_synth(synth, users=users, items=items, interactions=interactions, seed=0)
    ml = ROOT / "data" / "ml-100k"
    prepare_ml100k(ml, Path(os.environ.get("RAYREC_CACHE", Path.home() / ".cache" / "rayrec")))
    return {"synth": synth, "ml-100k": ml}


def synth_seed_data(cfg: BenchConfig, seed: int) -> Path:
    """The bench's synthetic dataset generated with ``seed`` (seed 0 is ``data/synth-ranker``)."""
    from training.data.synth import generate_synth

    users, items, interactions = cfg.synth
    path = ROOT / "data" / ("synth-ranker" if seed == 0 else f"synth-ranker-seed{seed}")
    generate_synth(path, users=users, items=items, interactions=interactions, seed=seed)
    return path


def train(config: str, data: Path, cfg: BenchConfig, run_id: str, extra: list[str] | None = None,
          reuse: bool = False) -> tuple[RankerRunConfig, Path, float]:  # fmt: skip
    """Train with the real job; returns the run config, the artifact folder and wall seconds.

    ``extra``: more ``--set`` overrides. ``reuse``: a run of that id with an exported artifact
    and the same resolved config is scored as it is (0 s) instead of trained again.
    """
    from training.config import dump_config
    from training.jobs.train_ranker import run

    overrides = [f"data.path={data}", f"data.max_train_rows={cfg.max_train_rows}",
                 f"data.max_eval_groups={cfg.max_eval_groups}", f"train.epochs={cfg.epochs}",
                 "runs_dir=runs/bench", "failure.max_failures=0", *(extra or [])]  # fmt: skip
    run_cfg = load_config(ROOT / "configs" / config, overrides)
    folder = ROOT / "runs" / "bench" / run_id
    if reuse and (folder / "ranker" / "ranker.json").exists() and dump_config(run_cfg) in (folder / "config.yaml").read_text():
        return run_cfg, folder / "ranker", 0.0
    t0 = time.perf_counter()
    run_dir = run(run_cfg, run_id=run_id)
    return run_cfg, run_dir.path / "ranker", time.perf_counter() - t0


# ---------------------------------------------------------------- measurements
def quality_rows(name: str, run_cfg: RankerRunConfig, artifact: Path, cfg: BenchConfig) -> tuple[list[dict], dict]:
    """Task, value-model, MBD and FM-hit-rate rows for one dataset; plus curves for plots."""
    scorer = load_ranker(artifact)
    data = build_ranking_data(Path(run_cfg.data.path), run_cfg.data.spec(), [t.name for t in run_cfg.model.tasks], run_cfg.seed)
    test, tasks = data.test, data.tasks
    shape = (len(data.features.dense_names), len(data.features.cohort_sizes), len(tasks))
    rows: list[dict] = []
    curves: dict[str, Any] = {"hit_rates": list(HIT_RATES), "auc": {}}
    params = {"train_rows": min(cfg.max_train_rows, data.train.num_rows), "epochs": cfg.epochs,
              "eval_lists": len(np.unique(test.column("group").to_numpy())), "eval_rows": test.num_rows}  # fmt: skip
    value = ValueModel.from_config(run_cfg.value, run_cfg.model.mbd.signals)
    ends = {rate: score_table(scorer.model, test, shape, 2048, rate, seed=1) for rate in (0.0, 1.0)}
    ends_metrics = {rate: task_metrics(ends[rate], test, tasks) for rate in ends}
    for rate in HIT_RATES:
        if rate in ends:
            scores = ends[rate]
            metrics = ends_metrics[rate]
        else:
            metrics = expected_at_hit_rate(ends[0.0], ends[1.0], ends_metrics, test, tasks, rate)
        system = "ranker" if rate == 0.0 else "ranker_fm_oracle" if rate == 1.0 else "ranker_fm_hit"
        extra = {"hit_rate": rate, "over": "every FM mask (exact expectation)"} if system == "ranker_fm_hit" else {}
        for key, v in metrics.items():
            task, metric = key.split("/")
            rows.append(_row(system, name, metric, v, task=task, **extra, **params))
            if metric == "auc":
                curves["auc"].setdefault(task, []).append(v)
        if rate not in (0.0, 1.0):
            continue
        out = outputs_from_scores(scores)
        fm = "oracle" if rate == 1.0 else "none"
        per_transform = {}
        for transform, system_t in SYSTEM_OF_TRANSFORM.items():
            vm = value.with_transform(transform)
            a, b = vm(out), vm.reweighted(cfg.reweight)(out)
            vals = value_metrics(a, test, run_cfg.eval.k)
            vals["top10_churn_on_reweight"] = top_k_churn(a, b, test, 10)
            per_transform[transform] = vals
            for metric, v in vals.items():
                rows.append(_row(system_t, name, metric, v, fm=fm, **params))
        curves[f"value_fm_{fm}"] = per_transform
        if fm == "oracle":
            rows += signal_bias_rows(name, scores, test, run_cfg, params)
    return rows, curves


def expected_at_hit_rate(none: dict[str, np.ndarray], always: dict[str, np.ndarray], ends: dict[float, dict[str, float]],
                         test, tasks: dict[str, str], rate: float) -> dict[str, float]:  # fmt: skip
    """Each task metric's expectation over every draw of which rows have their FM (each row
    independently with probability ``rate``), computed exactly instead of averaged over draws.

    Rows do not interact and MBD does not read the FM, so a row scores as in the all-FM pass
    when it has its FM and as in the no-FM pass otherwise. AUC is the share of (positive,
    negative) pairs in order; a pair is of one of four kinds, so
    E[AUC] = r²·A(FM, FM) + (1-r)²·A(none, none) + r(1-r)·(A(FM, none) + A(none, FM)),
    with A(x, y) the pair AUC of positives scored by path x against negatives scored by path y.
    NE and calibration are per-row sums over fixed denominators, so they mix linearly; RMSE is
    the root of the expected squared error. (Averaging 20 random draws, as this benchmark did
    before, left a noise of 2-5% of the FM's gain on the share the target reads.)
    """
    r = rate
    labels, masks = label_arrays(test, len(tasks))
    out: dict[str, float] = {}
    for t, (name, kind) in enumerate(tasks.items()):
        mix = lambda m: r * ends[1.0][f"{name}/{m}"] + (1 - r) * ends[0.0][f"{name}/{m}"]  # noqa: E731
        out[f"{name}/calibration"] = mix("calibration")
        if kind != "binary":
            out[f"{name}/rmse"] = float(np.sqrt(r * ends[1.0][f"{name}/rmse"] ** 2 + (1 - r) * ends[0.0][f"{name}/rmse"] ** 2))
            continue
        keep = masks[:, t] > 0
        y = labels[keep, t] > 0.5
        s0 = np.clip(none[f"pred/{name}"][keep].astype(np.float64), 1e-7, 1 - 1e-7)  # as task_metrics clamps
        s1 = np.clip(always[f"pred/{name}"][keep].astype(np.float64), 1e-7, 1 - 1e-7)
        cross = pair_auc(s1[y], s0[~y]) + pair_auc(s0[y], s1[~y])
        out[f"{name}/auc"] = r * r * ends[1.0][f"{name}/auc"] + (1 - r) ** 2 * ends[0.0][f"{name}/auc"] + r * (1 - r) * cross
        out[f"{name}/ne"] = mix("ne")
    return out


def pair_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Share of (positive, negative) pairs with the positive scored higher, ties counting half."""
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def signal_bias_rows(name: str, scores: dict[str, np.ndarray], test, run_cfg: RankerRunConfig, params: dict) -> list[dict]:
    """Each debiased signal's own cohort z-score against log(bias): the value's correlation is a
    weighted mix of these, and signals biased in opposite directions can cancel in it."""
    bias = test.column("bias").to_numpy().astype(np.float64) if "bias" in test.column_names else None
    if bias is None or not (bias > 0).all():
        return []
    out = []
    for signal, family in run_cfg.model.mbd.signals.items():
        z = standardize(torch.from_numpy(scores[f"raw_pred/{signal}"]).double(), torch.from_numpy(scores[f"mbd_mean/{signal}"]).double(),
                        torch.from_numpy(scores[f"mbd_var/{signal}"]).double(), family)  # fmt: skip
        raw = np.corrcoef(scores[f"pred/{signal}"].astype(np.float64), np.log(bias))[0, 1]
        out.append(_row("ranker", name, "signal_bias_corr", raw, signal=signal, fm="oracle", **params))
        out.append(_row("ranker_mbd_z", name, "signal_bias_corr", np.corrcoef(z.numpy(), np.log(bias))[0, 1],
                        signal=signal, fm="oracle", **params))  # fmt: skip
    return out


def cost_rows(name: str, artifact: Path, cfg: BenchConfig) -> tuple[list[dict], dict]:
    """FLOPs and latency of scoring 1,000 candidates for one user: ranker alone vs + sync FM."""
    from torch.utils.flop_counter import FlopCounterMode

    scorer = load_ranker(artifact)
    items = scorer.features.items.keys
    rng = np.random.default_rng(0)
    candidates = rng.choice(items, 1000, replace=len(items) < 1000)
    user = int(scorer.histories.keys[0])
    kjt, dense, cohorts = scorer.inputs(user, candidates)
    model = scorer.model
    settings = {"ranker": None, "ranker_sync_fm": torch.ones(1000, dtype=torch.bool)}
    rows, costs = [], {}
    torch.set_num_threads(1)
    for system, keep in settings.items():
        with torch.enable_grad(), FlopCounterMode(display=False) as counter:  # grad on: no fused fast path
            model(kjt, dense, cohorts, fm_keep=keep)
        times = []
        with torch.no_grad():
            model(kjt, dense, cohorts, fm_keep=keep)  # warm-up
            for _ in range(cfg.latency_repeats):
                t0 = time.perf_counter()
                model(kjt, dense, cohorts, fm_keep=keep)
                times.append((time.perf_counter() - t0) * 1000)
        flops = counter.get_total_flops()
        costs[system] = {"gflops": flops / 1e9, "ms_p50": statistics.median(times)}
        rows.append(_row(system, name, "gflops_per_1000_candidates", flops / 1e9, threads=1))
        rows.append(_row(system, name, "latency_ms_p50_per_1000_candidates", statistics.median(times), threads=1,
                         repeats=cfg.latency_repeats))  # fmt: skip
    rows += batch_rows(name, scorer, rng.choice(items, SERVING_BATCH[0] * SERVING_BATCH[1]), cfg)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return rows, costs


def batch_rows(name: str, scorer, candidates: np.ndarray, cfg: BenchConfig) -> list[dict]:
    """A serving batch scored the old way (one forward pass per request) vs in one pass (what
    ``serving.ranker.RankingStage`` does), inputs assembly included; no FM, one thread."""
    requests, per = SERVING_BATCH
    users = scorer.histories.keys[:requests]
    pair_users = np.repeat(users, per)
    ways = {
        "ranker_per_request": lambda: [scorer.score(int(u), candidates[i * per:(i + 1) * per]) for i, u in enumerate(users)],
        "ranker_one_pass": lambda: scorer.score(pair_users, candidates),
    }  # fmt: skip
    rows = []
    for system, call in ways.items():
        call()  # warm-up
        times = []
        for _ in range(cfg.latency_repeats):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1000)
        rows.append(_row(system, name, "latency_ms_p50_per_serving_batch", statistics.median(times), threads=1,
                         requests=requests, candidates=per, repeats=cfg.latency_repeats))  # fmt: skip
    return rows


def start_ray() -> None:
    import ray

    for attempt in range(3):  # a raylet on a loaded 2-core box can miss Ray's fixed 30 s start window
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
            return
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
            time.sleep(10)


def mbd_rows(cfg: BenchConfig, seeds: list[int], reuse: bool) -> list[dict]:
    """The MBD part (``benchmarks/mbd_baselines.py``): MBD and per-cohort baselines over seeds."""
    from mbd_baselines import measure

    def train_fn(config: str, data: Path, extra: list[str], run_id: str, reuse_run: bool):
        return train(config, data, cfg, run_id, extra, reuse_run)

    return measure(cfg, seeds, reuse, train_fn, lambda seed: synth_seed_data(cfg, seed))


def main_mbd_only(seeds: list[int], reuse: bool) -> None:
    """``--parts mbd``: run the MBD part alone and merge its rows into the existing report."""
    import ray

    from mbd_baselines import merge_into

    t0, load_average = time.perf_counter(), os.getloadavg()[0]
    start_ray()
    rows = mbd_rows(BenchConfig(), seeds, reuse)
    ray.shutdown()
    command = f"{COMMAND} --parts mbd --seeds {' '.join(map(str, seeds))}" + (" --reuse-runs" if reuse else "")
    merge_into(OUT_DIR / "ranking.json", rows, {"command": command, "git_commit": git_commit(), "seconds": round(time.perf_counter() - t0, 1),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_average_at_start": round(load_average, 2)})  # fmt: skip
    render()
    print((OUT_DIR / "ranking.md").read_text())


def main(seeds: list[int], reuse: bool) -> None:
    import ray

    cfg = BenchConfig()
    t0 = time.perf_counter()
    load_average = os.getloadavg()[0]
    paths = prepare_data(cfg)
    start_ray()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    trained = {
        "synth": train("synth-ranker.yaml", paths["synth"], cfg, f"bench-synth-{stamp}"),
        "ml-100k": train("ml100k-ranker.yaml", paths["ml-100k"], cfg, f"bench-ml100k-{stamp}"),
    }
    mbd = mbd_rows(cfg, seeds, reuse)
    ray.shutdown()
    rows, curves, costs = [], {}, {}
    for name, (run_cfg, artifact, seconds) in trained.items():
        r, curves[name] = quality_rows(name, run_cfg, artifact, cfg)
        rows += r
        c_rows, costs[name] = cost_rows(name, artifact, cfg)
        rows += c_rows + [_row("ranker", name, "train_wall_s", seconds, workers=2, epochs=cfg.epochs)]
    rows += mbd
    images = plot(curves, costs)
    report = {
        "benchmark": "ranking",
        "command": COMMAND,
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**_machine(), "load_average_at_start": round(load_average, 2)},
        "versions": {k: v for k, v in library_versions().items() if k != "python"},
        "config": asdict(cfg),
        "datasets": list(trained),
        "setup": setup_text(cfg),
        "rows": rows,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "ranking.md").write_text(markdown(report, images))
    payload = {k: report[k] for k in ("benchmark", "command", "git_commit", "date", "machine", "versions", "seconds", "rows")}
    payload["parts"] = {"mbd_baselines": {"command": COMMAND, "git_commit": report["git_commit"], "date": report["date"]}}
    (OUT_DIR / "ranking.json").write_text(json.dumps(payload, indent=2) + "\n")
    print((OUT_DIR / "ranking.md").read_text())


def render() -> None:
    """Rebuild ranking.md from ranking.json alone (every figure in the report is a row there)."""
    payload = json.loads((OUT_DIR / "ranking.json").read_text())
    datasets = list(dict.fromkeys(r["dataset"] for r in payload["rows"]))
    report = {**payload, "datasets": datasets, "setup": setup_text(BenchConfig())}
    images = [p.name for p in sorted(OUT_DIR.glob("ranking_*.png"))]
    (OUT_DIR / "ranking.md").write_text(markdown(report, images))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", action="store_true", help="rebuild ranking.md from ranking.json (no training)")
    parser.add_argument("--parts", choices=["all", "mbd"], default="all",
                        help="mbd: only MBD against the per-cohort baselines, merged into the existing report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="MBD part: generator and training seeds")
    parser.add_argument("--reuse-runs", action="store_true", help="MBD part: score runs/bench/mbd-* already trained")
    args = parser.parse_args()
    if args.render:
        render()
    elif args.parts == "mbd":
        main_mbd_only(args.seeds, args.reuse_runs)
    else:
        main(args.seeds, args.reuse_runs)
