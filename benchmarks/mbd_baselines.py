"""MBD against per-cohort normalisation on the same inputs: the ranking benchmark's MBD part.

Run: ``.venv/bin/python benchmarks/bench_ranking.py --parts mbd`` (this part alone; its rows
replace the earlier MBD-part rows of ``docs/benchmarks/ranking.json`` and the Markdown is
rebuilt) or plain ``bench_ranking.py`` (every part). Add ``--reuse-runs`` to use runs already
trained under ``runs/bench/mbd-*`` (same resolved config) instead of training them again, and
their saved metrics when the measuring code has not changed since.

Why: MBD was only compared with the raw value. A debiaser earns its keep only if it beats what a
user could do without a model: z-scores against the training log's global mean/std
(``global_z``), against each cohort's empirical mean/std (``cohort_groupby_z``), or percentiles
within each cohort's empirical distribution (``cohort_quantile``), all from
:mod:`training.models.cohort_norm`, with the cohorts MBD conditions on.

How, per seed s (the generator's seed and the training seed both s) and per cohort spec:

* ``planted``: MBD's cohort is the config's (item length bucket, category, user activity
  quintile), exactly the planted bias variables: the best case;
* ``misspecified``: ``activity`` left out, ``noise`` (5 random buckets per item, which no signal
  depends on) added, for MBD (retrained) and the groupby baselines alike. Same cell count
  (20 × 8 × 5).

Each (seed, spec) trains the real job (``configs/synth-ranker.yaml``, the sizes of
:class:`bench_ranking.BenchConfig`), loads the exported artifact and scores the training rows
(for the quantile baseline) and the held-out lists with the FM present. The normalisers are fitted on
those same training rows. Every system feeds one value model (the config's weights, transform
``z`` or ``pct``); metrics per system: ``bias_corr`` (Pearson, value vs log item length, pooled;
param ``bias``: ``log_length``, also ``activity``), ``ndcg@10_true_pref`` (per list, relevance =
the generator's true preference), ``calibration`` (per signal: Σ cohort mean / Σ label over the
held-out rows, model space) and ``cohort_calibration_error`` (per signal: row-weighted mean
|cohort mean - held-out label mean| over the planted cells, in units of the held-out labels' std).
Reported as mean and standard error over the seeds (rows with param ``stat``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbd_report import PART
from training.data.list_columns import list_matrix
from training.data.ranking_examples import build_ranking_data, label_arrays
from training.jobs.train_ranker import RankerRunConfig, outputs_from_scores, value_metrics
from training.models.cohort_norm import CohortGroupbyNorm, CohortQuantileNorm, GlobalNorm, Normaliser
from training.models.mbd import to_model_space
from training.models.ranker_artifact import load_ranker
from training.models.ranker_scoring import score_table
from training.models.value import ValueModel

PLANTED_CELLS = ("length", "category", "activity")


@dataclass(frozen=True)
class CohortSpec:
    """One partial feature set for MBD and the groupby baselines.

    Args:
        name: ``planted`` or ``misspecified`` (the rows' param ``cohorts``).
        cohort: cohort feature names (``model.mbd.cohort``).
        noise_buckets: ``data.noise_buckets`` (0: no ``noise`` feature).
    """

    name: str
    cohort: tuple[str, ...]
    noise_buckets: int = 0


SPECS = (
    CohortSpec("planted", ("length", "category", "activity")),
    CohortSpec("misspecified", ("length", "category", "noise"), noise_buckets=5),
)


def run_id(spec: CohortSpec, seed: int) -> str:
    return f"mbd-{spec.name}-seed{seed}"


def overrides(spec: CohortSpec, seed: int, data: Path) -> list[str]:
    """Config overrides (on top of the bench's sizes) for one (spec, seed) run."""
    return [f"seed={seed}", f"data.path={data}", f"data.noise_buckets={spec.noise_buckets}",
            f"model.mbd.cohort=[{', '.join(spec.cohort)}]"]  # fmt: skip


# ---------------------------------------------------------------- one run
def cohort_columns(cohort_sizes: dict[str, int], names: tuple[str, ...]) -> list[int]:
    """Positions of the named cohort features in the example tables' ``cohorts`` column."""
    return [list(cohort_sizes).index(n) for n in names]


def run_metrics(run_cfg: RankerRunConfig, artifact: Path, spec: CohortSpec) -> dict[tuple[str, str, str], float]:
    """Every system's metrics for one trained run: {(system, metric, key): value}; key names the
    signal or bias variable ("" when neither)."""
    scorer = load_ranker(artifact)
    data = build_ranking_data(Path(run_cfg.data.path), run_cfg.data.spec(), [t.name for t in run_cfg.model.tasks], run_cfg.seed)
    sizes = data.features.cohort_sizes
    shape = (len(data.features.dense_names), len(sizes), len(data.tasks))
    families = dict(run_cfg.model.mbd.signals)
    names = list(data.tasks)
    train, test = data.train, data.test
    columns = cohort_columns(sizes, spec.cohort)

    def cohorts_of(table, cols: list[int]) -> np.ndarray:
        return list_matrix(table.column("cohorts"), len(sizes), np.int64)[:, cols]  # [N, C']

    labels, masks = label_arrays(train, len(names))  # [N, T]
    y_train = {s: labels[:, names.index(s)] for s in families}
    m_train = {s: masks[:, names.index(s)] for s in families}
    train_scores = score_table(scorer.model, train, shape, 2048, 1.0, seed=2)
    train_pred = {s: train_scores[f"raw_pred/{s}"] for s in families}
    fit_cohorts = cohorts_of(train, columns)
    normalisers: dict[str, Normaliser] = {
        "global_z": GlobalNorm.fit(y_train, m_train, families),
        "cohort_groupby_z": CohortGroupbyNorm.fit(fit_cohorts, y_train, m_train, families),
        "cohort_quantile": CohortQuantileNorm.fit(fit_cohorts, train_pred, m_train, families),
    }
    scores = score_table(scorer.model, test, shape, 2048, 1.0, seed=1)
    out = outputs_from_scores(scores)
    test_cohorts = torch.from_numpy(cohorts_of(test, columns))
    value = ValueModel.from_config(run_cfg.value, families)
    systems = {
        "ranker": (value.with_transform("raw"), out),
        "mbd_z": (value.with_transform("z"), out),
        "mbd_pct": (value.with_transform("pct"), out),
        "global_z": (value.with_transform("z"), normalisers["global_z"].apply(out, test_cohorts)),
        "cohort_groupby_z": (value.with_transform("z"), normalisers["cohort_groupby_z"].apply(out, test_cohorts)),
        "cohort_quantile": (value.with_transform("pct"), normalisers["cohort_quantile"].apply(out, test_cohorts)),
    }
    activity = list_matrix(test.column("dense"), shape[0], np.float32)[:, data.features.dense_names.index("user_activity")]
    test_labels, test_masks = label_arrays(test, len(names))
    cells = cohorts_of(test, cohort_columns(sizes, PLANTED_CELLS))
    cell_id = np.unique(cells, axis=0, return_inverse=True)[1].reshape(-1)  # [N]
    result: dict[tuple[str, str, str], float] = {}
    for system, (vm, o) in systems.items():
        v = vm(o).double()
        m = value_metrics(v, test, run_cfg.eval.k)
        result[(system, "bias_corr", "log_length")] = m.get("bias_corr", float("nan"))
        result[(system, "bias_corr", "activity")] = float(np.corrcoef(v.numpy(), activity)[0, 1])
        result[(system, "ndcg@10_true_pref", "")] = m[f"ndcg@{run_cfg.eval.k}"]
        result[(system, "kendall_tau_truth", "")] = m.get("kendall_tau_truth", float("nan"))
        if system == "ranker":
            continue
        for s, family in families.items():
            keep = test_masks[:, names.index(s)] > 0
            y = to_model_space(torch.from_numpy(test_labels[keep, names.index(s)]).double(), family).numpy()
            mean = o.mbd_mean[s].double().numpy()[keep]
            if system == "cohort_quantile":  # its z is Φ⁻¹(percentile), its mean that of its fitted values
                mean = normalisers[system].cohort_means(test_cohorts[torch.from_numpy(keep)])[s].numpy()
            result[(system, "calibration", s)] = float(mean.sum() / y.sum())
            result[(system, "cohort_calibration_error", s)] = cohort_gap(mean, y, cell_id[keep])
    return result


def cached_metrics(run_cfg: RankerRunConfig, artifact: Path, spec: CohortSpec, reuse: bool) -> dict[tuple[str, str, str], float]:
    """:func:`run_metrics`, saved beside the run (``mbd_metrics.json``) with a digest of the code
    that measured it; a reused run whose saved digest matches is not scored again."""
    import hashlib

    here = Path(__file__).resolve()
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in (here, here.parents[1] / "training/models/cohort_norm.py"))).hexdigest()[:16]
    path = artifact.parent / "mbd_metrics.json"
    if reuse and path.exists() and (saved := json.loads(path.read_text())).get("code") == digest:
        return {tuple(k.split("|")): v for k, v in saved["metrics"].items()}
    result = run_metrics(run_cfg, artifact, spec)
    path.write_text(json.dumps({"code": digest, "metrics": {"|".join(k): v for k, v in result.items()}}, indent=1))
    return result


def cohort_gap(mean: np.ndarray, y: np.ndarray, cell: np.ndarray) -> float:
    """Row-weighted mean over cells of |mean(predicted cohort mean) - mean(label)|, in units of
    the labels' std; ``mean, y, cell`` ``[N]``."""
    n = np.bincount(cell)
    gap = np.abs(np.bincount(cell, mean) - np.bincount(cell, y))  # = n · |Δ mean| per cell
    return float(gap[n > 0].sum() / n.sum() / max(y.std(), 1e-12))


# ---------------------------------------------------------------- seeds → rows
def summarise(per_seed: dict[str, list[dict[tuple[str, str, str], float]]], seeds: list[int], params: dict[str, Any]) -> list[dict]:
    """Mean and standard error over seeds of every (system, metric, key): one row each."""
    rows = []
    for spec_name, results in per_seed.items():
        for key in results[0]:
            values = np.array([r[key] for r in results], dtype=np.float64)
            system, metric, detail = key
            extra = {"signal": detail} if metric in ("calibration", "cohort_calibration_error") else {}
            if metric == "bias_corr":
                extra = {"bias": detail}
            se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
            common = {"part": PART, "cohorts": spec_name, **extra, "seeds": seeds, "fm": "oracle", **params}
            rows.append(_row(system, metric, float(values.mean()), stat="mean", **common))
            rows.append(_row(system, metric, se, stat="se", **common))
            rows.append(_row(system, metric, None, stat="per_seed", values=[round(float(x), 5) for x in values], **common))
    return rows


def _row(system: str, metric: str, value: float | None, **params) -> dict[str, Any]:
    ok = value is not None and np.isfinite(value)
    row = {"system": system, "dataset": "synth", "metric": metric, "value": round(float(value), 5) if ok else None, "params": params}
    if not ok:
        row["note"] = "per-seed values in params" if params.get("stat") == "per_seed" else "not measurable"
    return row


def measure(cfg, seeds: list[int], reuse: bool, train_fn, data_fn) -> list[dict]:
    """Train (or reuse) every (spec, seed) run, score it, and return the summary rows.

    ``train_fn(config, data, overrides, run_id)`` → (run config, artifact folder, seconds) and
    ``data_fn(seed)`` → the seed's synth folder come from ``bench_ranking`` (one place that
    knows the bench's sizes and how to call the job).
    """
    per_seed: dict[str, list[dict]] = {s.name: [] for s in SPECS}
    walls = []
    for seed in seeds:
        data = data_fn(seed)
        for spec in SPECS:
            t0 = time.perf_counter()
            run_cfg, artifact, seconds = train_fn("synth-ranker.yaml", data, overrides(spec, seed, data), run_id(spec, seed), reuse)
            per_seed[spec.name].append(cached_metrics(run_cfg, artifact, spec, reuse and seconds == 0.0))
            walls.append(seconds)
            print(f"[mbd] {spec.name} seed {seed}: trained {seconds:.0f} s, scored {time.perf_counter() - t0 - seconds:.0f} s", flush=True)
    params = {"train_rows": cfg.max_train_rows, "epochs": cfg.epochs, "eval_lists": cfg.max_eval_groups}
    return summarise(per_seed, seeds, params)


def merge_into(path: Path, rows: list[dict], info: dict[str, Any]) -> None:
    """Replace this part's rows of an existing ``ranking.json`` with ``rows``; ``info`` (command,
    commit, date, seconds) goes under ``parts.mbd_baselines``."""
    payload = json.loads(path.read_text())
    payload["rows"] = [r for r in payload["rows"] if r["params"].get("part") != PART] + rows
    payload.setdefault("parts", {})[PART] = info
    path.write_text(json.dumps(payload, indent=2) + "\n")
