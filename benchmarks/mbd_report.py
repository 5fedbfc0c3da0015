"""The ranking report's MBD-vs-baselines section, from the rows of ``benchmarks/mbd_baselines.py``.

Every figure is mean ± standard error over seeds; each verdict compares a baseline with the MBD
transform of the same kind (``global_z`` and ``cohort_groupby_z`` with ``mbd_z``,
``cohort_quantile`` with ``mbd_pct``) on the *paired* per-seed differences (same data, same
trained ranker), so the seed-to-seed spread that both share cancels.
"""

from __future__ import annotations

import numpy as np

PART = "mbd_baselines"
SYSTEMS = ("ranker", "mbd_z", "mbd_pct", "global_z", "cohort_groupby_z", "cohort_quantile")
RIVAL = {"global_z": "mbd_z", "cohort_groupby_z": "mbd_z", "cohort_quantile": "mbd_pct"}
SIGNALS = ("watch_time", "loop", "comment")


def _get(rows: list[dict], stat: str, **match) -> float | list | None:
    for r in rows:
        p = r["params"]
        if p.get("part") == PART and p.get("stat") == stat and all(r.get(k) == v or p.get(k) == v for k, v in match.items()):
            return p["values"] if stat == "per_seed" else r["value"]
    return None


def _pm(rows: list[dict], digits: int = 3, **match) -> str:
    mean, se = _get(rows, "mean", **match), _get(rows, "se", **match)
    if mean is None:
        return "n/a"
    return f"{mean:+.{digits}f} ± {se:.{digits}f}" if se is not None else f"{mean:+.{digits}f}"


def verdict(rows: list[dict], baseline: str, cohorts: str) -> str:
    """One line: does the baseline match or beat its MBD rival on bias and on NDCG?"""
    rival = RIVAL[baseline]
    parts = []
    for metric, extra, better in (("bias_corr", {"bias": "log_length"}, "lower |·|"), ("ndcg@10_true_pref", {}, "higher")):
        va = _get(rows, "per_seed", system=baseline, metric=metric, cohorts=cohorts, **extra)
        vb = _get(rows, "per_seed", system=rival, metric=metric, cohorts=cohorts, **extra)
        if va is None or vb is None:
            continue
        a, b = np.asarray(va, np.float64), np.asarray(vb, np.float64)
        d = (np.abs(a) - np.abs(b)) if metric == "bias_corr" else (a - b)  # baseline − MBD
        mean, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        gain = mean if metric == "bias_corr" else -mean  # > 0: MBD better
        shown = f"{baseline} − MBD = {mean:+.3f} ± {se:.3f}"
        if gain > 2 * se:
            word = f"MBD better ({shown})"
        elif gain < -2 * se:
            word = f"**{baseline} beats MBD** ({shown})"
        else:
            word = f"**{baseline} matches MBD** ({shown}, within 2 se)"
        name = "|bias corr|" if metric == "bias_corr" else "NDCG@10"
        parts.append(f"{name} ({better} is better): {word}")
    return f"- {cohorts}, `{baseline}` vs `{rival}`: " + "; ".join(parts) + "."


def section(rows: list[dict], info: dict | None) -> list[str]:
    """The Markdown lines of the MBD part (empty when the report has no such rows)."""
    if not any(r["params"].get("part") == PART for r in rows):
        return []
    seeds = next(r["params"]["seeds"] for r in rows if r["params"].get("part") == PART)
    info = info or {}
    lines = ["## synth: MBD against per-cohort normalisation on the same inputs", "",
             f"Command: `{info.get('command', 'see above')}`"
             + (f", {info['seconds']:.0f} s wall" if info.get("seconds") else "")
             + (f", commit {info['git_commit']}, {info['date']}" if info.get("git_commit") else "")
             + (f", load average at start {info['load_average_at_start']}" if "load_average_at_start" in info else "") + "."
             + (" With `--reuse-runs` the wall time excludes training: the runs under `runs/bench/mbd-*` were trained "
                "before by the same `train()` with the same resolved configs, and scored by the same code (each run's "
                "`mbd_metrics.json` carries a digest of it)." if "--reuse-runs" in info.get("command", "") else ""),
             "",
             f"Mean ± standard error over {len(seeds)} seeds ({', '.join(map(str, seeds))}: the generator's seed and the "
             "training seed both). One trained ranker per (seed, cohort set); every system scores its value from the "
             "same predictions (FM present) with the config's weights. `planted`: MBD's cohort and the groupby "
             "cells are (length bucket, category, activity quintile), the planted bias variables; `misspecified`: "
             "activity left out, `noise` (5 random item buckets) added, MBD retrained. Baselines are fitted on the "
             "run's training rows: z-scores on the labels, quantiles on the ranker's predictions of those rows; "
             "cells with under 10 rows or unseen back off to global. Correlations are pooled over the held-out "
             "rows; the activity column shows the bias of the left-out variable.", ""]  # fmt: skip
    for cohorts in ("planted", "misspecified"):
        if _get(rows, "mean", system="mbd_z", metric="ndcg@10_true_pref", cohorts=cohorts) is None:
            continue
        lines += [f"**{cohorts} cohorts**", "",
                  "| system | corr(value, log length) | corr(value, activity) | NDCG@10 (true pref) | Kendall τ | "
                  "calibration watch_time / loop / comment | cohort calibration error (mean of signals) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for system in SYSTEMS:
            get = lambda metric, **kw: _pm(rows, system=system, metric=metric, cohorts=cohorts, **kw)  # noqa: E731
            cal = " / ".join(_pm(rows, 2, system=system, metric="calibration", cohorts=cohorts, signal=s) for s in SIGNALS)
            errs = [_get(rows, "mean", system=system, metric="cohort_calibration_error", cohorts=cohorts, signal=s) for s in SIGNALS]
            err = "n/a" if None in errs else f"{np.mean(errs):.3f}"
            lines.append(f"| {system} | {get('bias_corr', bias='log_length')} | {get('bias_corr', bias='activity')} | "
                         f"{get('ndcg@10_true_pref', digits=4)} | {get('kendall_tau_truth')} | {cal if system != 'ranker' else '—'} | "
                         f"{err if system != 'ranker' else '—'} |")  # fmt: skip
        lines += ["", "Against MBD (paired per-seed differences; \"matches\" = within 2 standard errors):", ""]
        lines += [verdict(rows, b, cohorts) for b in RIVAL]
        lines.append("")
    lines += ["Reading: **calibration** is Σ cohort mean / Σ held-out label in the signal's model space "
              "(log1p for watch time; 1 = right on average); **cohort calibration error** is the row-weighted mean "
              "|cohort mean − held-out label mean| over the planted (length, category, activity) cells, in units of "
              "the signal's std: how well a system's cohort statistics track the cells that carry the bias "
              "(`cohort_quantile`'s mean is that of the predictions it was fitted on). `ranker` is the raw value "
              "(no normalisation) for reference.", ""]  # fmt: skip
    return lines
