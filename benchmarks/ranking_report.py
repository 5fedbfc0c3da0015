"""The ranking benchmark's report: Markdown, notes, verdicts against the issue's targets and
plots, built from the result rows alone (``bench_ranking.py`` measures; ``--render`` rebuilds
the Markdown from ``ranking.json`` with this module)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from mbd_report import section as mbd_section

OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
HIT_RATES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
SYSTEM_OF_TRANSFORM = {"raw": "ranker", "z": "ranker_mbd_z", "pct": "ranker_mbd_pct"}
SERVING_BATCH = (16, 50)  # requests x candidates: a full @serve.batch of the serving ranker


# ---------------------------------------------------------------- report
def machine() -> dict:
    """The CPU, cores and memory of this machine (no GPU is used)."""
    cpu = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20), "gpu": None}


def setup_text(cfg) -> str:
    """One paragraph on how the bench was set up, from its ``BenchConfig``."""
    return (
        f"each dataset trains its config with the real job (2 Ray Train workers, {cfg.epochs} epochs over "
        f"{cfg.max_train_rows:,} sampled examples); synth = `rayrec data synth` with users/items/interactions "
        f"{cfg.synth} (dataset `synth`); ml-100k lists = each held-out (test) rating + 20 unrated items, "
        f"relevance = rating; synth lists = a user's held-out rows (20% of train rows), relevance = "
        f"true_pref; at most {cfg.max_eval_groups} lists each. Churn: weights changed to {cfg.reweight}."
    )


def plot(curves: dict[str, dict], costs: dict[str, dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    synth = curves.get("synth", {}).get("value_fm_oracle")
    if synth:
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, metric, title in zip(axes, ("bias_corr", "kendall_tau_truth", "ndcg@10"),
                                     ("corr(value, log item length)", "Kendall τ with true_pref", "NDCG@10 (true_pref)")):  # fmt: skip
            values = [synth[t].get(metric, np.nan) for t in ("raw", "z", "pct")]
            ax.bar(["raw", "z-score", "percentile"], values, color=["#888", "#3b7dd8", "#2a9d8f"])
            ax.set_title(title, fontsize=9)
            ax.axhline(0, color="black", lw=0.5)
        fig.suptitle("MBD on synthetic data: value-model transforms", fontsize=10)
        fig.tight_layout()
        fig.savefig(OUT_DIR / "ranking_mbd.png", dpi=110)
        plt.close(fig)
        images.append("ranking_mbd.png")

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.2), squeeze=False)
    for ax, (dataset, c) in zip(axes[0], curves.items()):
        for task, aucs in c["auc"].items():
            ax.plot([100 * r for r in c["hit_rates"]], aucs, marker="o", label=task)
        ax.set_xlabel("FM hit rate (%)  (0 = no FM, 100 = oracle)")
        ax.set_ylabel("AUC")
        ax.set_title(dataset, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT_DIR / "ranking_fm_hit_rate.png", dpi=110)
    plt.close(fig)
    images.append("ranking_fm_hit_rate.png")
    return images


def _find(rows: list[dict], **match) -> float | None:
    for r in rows:
        if all(r.get(k) == v or r["params"].get(k) == v for k, v in match.items()):
            return r["value"]
    return None


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(report: dict, images: list[str]) -> str:
    rows = report["rows"]
    m = report["machine"]
    lines = [
        "# Ranking benchmark: MTML ranker, MBD debiasing, value model, foundation model",
        "",
        f"Command: `{report['command']}` (`make bench-ranking`)"
        + (f", {report['seconds']:.0f} s wall" if report.get("seconds") else "")
        + f". Commit {report['git_commit']}, {report['date']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; load average at start "
        f"{m['load_average_at_start']} (other jobs shared these cores: latencies are indicative). Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        "Setup: " + report["setup"],
        "",
    ]
    for dataset in report["datasets"]:
        tasks = sorted({r["params"]["task"] for r in rows if r["dataset"] == dataset and "task" in r["params"]})
        lines += [f"## {dataset}: per task (held-out lists)", "",
                  "| task | FM | AUC | NE | calibration (pred/actual) | RMSE |", "|---|---|---|---|---|---|"]  # fmt: skip
        for task in tasks:
            for system, label in (("ranker", "none"), ("ranker_fm_oracle", "always")):
                get = lambda metric: _find(rows, system=system, dataset=dataset, metric=metric, task=task)
                lines.append(f"| {task} | {label} | {_fmt(get('auc'))} | {_fmt(get('ne'))} | {_fmt(get('calibration'))} | {_fmt(get('rmse'))} |")
        lines += ["", "Value-model ordering (FM always present):", "",
                  "| transform | NDCG@10 | Kendall τ (true_pref) | corr(value, log length) | top-10 churn on reweight |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for transform, system in SYSTEM_OF_TRANSFORM.items():
            get = lambda metric: _find(rows, system=system, dataset=dataset, metric=metric, fm="oracle")
            lines.append(f"| {transform} | {_fmt(get('ndcg@10'))} | {_fmt(get('kendall_tau_truth'))} | "
                         f"{_fmt(get('bias_corr'))} | {_fmt(get('top10_churn_on_reweight'), 3)} |")  # fmt: skip
        signals = [r["params"]["signal"] for r in rows if r["dataset"] == dataset and r["metric"] == "signal_bias_corr" and r["system"] == "ranker"]
        if signals:
            lines += ["", "Per debiased signal, correlation with log length (raw prediction → its MBD z-score; "
                      "the value mixes these, so opposite residuals can cancel there):", ""]  # fmt: skip
            lines.append("; ".join(f"{s} {_fmt(_find(rows, system='ranker', dataset=dataset, metric='signal_bias_corr', signal=s), 3)} → "
                                   f"{_fmt(_find(rows, system='ranker_mbd_z', dataset=dataset, metric='signal_bias_corr', signal=s), 3)}"
                                   for s in signals) + ".")  # fmt: skip
        lines += ["", "AUC by FM hit rate (0 = no FM, 1 = oracle):", "",
                  "| task | " + " | ".join(f"{r:g}" for r in HIT_RATES) + " | share of oracle gain at 0.9 |",
                  "|---|" + "---|" * (len(HIT_RATES) + 1)]  # fmt: skip
        for task in tasks:
            aucs = [_find(rows, dataset=dataset, metric="auc", task=task, system="ranker")]
            aucs += [_find(rows, dataset=dataset, metric="auc", task=task, hit_rate=r) for r in HIT_RATES[1:-1]]
            aucs += [_find(rows, dataset=dataset, metric="auc", task=task, system="ranker_fm_oracle")]
            if None in aucs:
                continue
            gain = aucs[-1] - aucs[0]
            share = (aucs[HIT_RATES.index(0.9)] - aucs[0]) / gain if abs(gain) > 1e-4 else None
            lines.append(f"| {task} | " + " | ".join(_fmt(a) for a in aucs) + f" | {_fmt(share, 2)} |")
        lines += ["", "Cost of scoring 1,000 candidates for one user (1 thread):", "",
                  "| system | GFLOPs | latency p50 (ms) |", "|---|---|---|"]  # fmt: skip
        for system in ("ranker", "ranker_sync_fm"):
            gflops = _find(rows, system=system, dataset=dataset, metric="gflops_per_1000_candidates")
            ms = _find(rows, system=system, dataset=dataset, metric="latency_ms_p50_per_1000_candidates")
            lines.append(f"| {system} | {_fmt(gflops, 3)} | {_fmt(ms, 1)} |")
        each = _find(rows, system="ranker_per_request", dataset=dataset, metric="latency_ms_p50_per_serving_batch")
        once = _find(rows, system="ranker_one_pass", dataset=dataset, metric="latency_ms_p50_per_serving_batch")
        if each and once:
            lines += ["", f"A serving batch of {SERVING_BATCH[0]} requests × {SERVING_BATCH[1]} candidates (no FM, 1 thread, "
                      f"feature assembly included): one forward pass per request {each:.1f} ms, one for the batch "
                      f"{once:.1f} ms ({each / once:.1f}× less; the serving ranker does the latter)."]  # fmt: skip
        wall = _find(rows, system="ranker", dataset=dataset, metric="train_wall_s")
        lines += ["", f"Training wall time (2 workers, shared cores): {_fmt(wall, 0)} s.", ""]
    lines += mbd_section(rows, report.get("parts", {}).get("mbd_baselines"))
    lines += [f"![{img}]({img})" for img in images]
    lines += ["", "## Against the issue's targets", ""] + verdicts(rows)
    lines += ["", "## Reading the numbers", ""] + NOTES + ["", "Raw rows: `ranking.json`."]
    return "\n".join(lines) + "\n"


NOTES = [
    "- **Systems.** `ranker` = raw value transform (and, for task rows, FM hit rate 0), `ranker_mbd_z` / "
    "`ranker_mbd_pct` = the same model's value score with MBD z-score / percentile transforms, "
    "`ranker_fm_hit` = FM available for that share of candidates, `ranker_fm_oracle` = always. One trained "
    "model per dataset: the transforms and hit rates are evaluation-time choices, which is the point "
    "(value weights and transforms need no retraining; the FM-dropout-trained ranker serves every hit rate).",
    "- **Bias correlation** is the Pearson correlation between the value score and log item length over "
    "all held-out synth rows (pooled across users). The synth config's MBD cohort is item length "
    "(20 quantile buckets), content type and user-activity quintile, so a z-score removes "
    "*between-bucket* length effects. Length variation inside a bucket is not what remains: z-scores "
    "against the *empirical* label mean and variance of each (length, type, activity) cell leave a "
    "value correlation of about +0.05 on the same predictions. What remains is the MBD heads' fit of "
    "the cell means after the run's ~300 steps (each signal's own residual is listed above; they "
    "partly cancel in the value). Heads on their own cohort embeddings, in standardized units of "
    "each signal (`training/models/mbd.py`), took the value's correlation from +0.20 to the figure above.",
    "- **Top-10 churn on reweight** is the share of a list's top 10 that changes when the value weights "
    "change (lists with more than 10 candidates). On the raw scale watch time (seconds) dwarfs the "
    "probabilities, so reweighting the other signals barely moves the order: low churn there means the "
    "weights are *ineffective*, not that the ranking is stable. On z / percentile scales every signal "
    "is comparable and a weight change does what it says.",
    "- **NE** is cross-entropy normalised by the entropy of the label rate (below 1 beats predicting "
    "the base rate); **calibration** is Σ predicted / Σ actual (1 is calibrated). On ml-100k the "
    "ranker trains on 2 sampled unrated items per rating but is evaluated on lists of 1 rating + 20 "
    "unrated items, so `like` / `rated` base rates are about 7× lower at evaluation. The job ends "
    "with a per-path Platt calibration of each binary task on the validation lists "
    "(`training/models/calibration.py`), which brought ml-100k's calibration from 4-5 to about 1 and "
    "its NE from 1.3-1.6 to 0.84-0.85; AUC with no FM or all FM does not move (the map is monotone). "
    "The *raw* value transform's NDCG on ml-100k fell from 0.46 to 0.36 with it: that sum adds a like "
    "probability, a rated probability and a 1-5 rating regression with fixed weights, and calibration "
    "shrank the probabilities about 5× to the lists' base rates, so the rating term now dominates. The "
    "configured value (percentiles of MBD z-scores, which read the uncalibrated prediction) is unchanged: "
    "scale-free terms are what MBD is for.",
    "- **FM**: the synthetic generator plants short-term intent (an item of the same content type as "
    "the user's previous exposure is preferred, `session_weight` in `training/data/synth.py`); the "
    "ranker's features (id rows, mean-pooled history, dense, cohorts) barely see it and the FM, which "
    "reads the history in order with positions counted from the newest item, does. Two changes made "
    "the FM's gain measurable: positions from the newest item (token 1 is the latest item whatever the "
    "history's length; before, it sat at a position that moved with the length) and 6 epochs instead "
    "of 2 (at 2 the FM had not learned the session term: synth comment no FM 0.677 → oracle 0.684, "
    "loop 0.703 → 0.704). Intermediate hit rates are the **exact expectation over every FM mask** "
    "(each row keeps its FM with probability r): AUC counts (positive, negative) pairs, and a pair "
    "has FM on both sides with probability r², on neither (1-r)², on one 2r(1-r), so E[AUC] mixes the "
    "two ends' AUCs and the two cross-path pair AUCs. The previous runs averaged 20 random draws, "
    "which left 2-5% of the FM's gain as noise on the share. What the target asks is close to a "
    "ceiling: if mixed pairs were ordered as well as the average of the two paths, the share would be "
    "0.81 + 0.18/2 = 0.90. A simulation with *ideally* calibrated paths (true probabilities given "
    "what each path knows; logit = a + b, the no-FM path knows a, label rates 5-25%, AUC gains "
    "0.01-0.04) gives 0.90-0.91, and refitting each path's calibration on the test lists themselves "
    "(quantile-binned, an optimistic bound) moves this run's shares by at most +0.015. So the ranker is at "
    "what any calibrated two-path scorer can keep at 90% hits. **The missing path is an imputer** "
    "(`model.foundation.impute`): an MLP over the ranker's own features distilled from the FM "
    "embedding, in place of one learned constant. Each binary task gets a per-path Platt calibration "
    "on the validation lists, so both paths are on one probability scale. "
    "Latency is one user × 1,000 candidates in one forward "
    "pass on one thread; the synchronous FM runs the transformer over every (history, candidate) pair.",
]


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    raw = _find(rows, system="ranker", dataset="synth", metric="bias_corr", fm="oracle")
    for t, system in (("z", "ranker_mbd_z"), ("pct", "ranker_mbd_pct")):
        deb = _find(rows, system=system, dataset="synth", metric="bias_corr", fm="oracle")
        nd_raw = _find(rows, system="ranker", dataset="synth", metric="ndcg@10", fm="oracle")
        nd = _find(rows, system=system, dataset="synth", metric="ndcg@10", fm="oracle")
        if raw is None or deb is None or nd is None or nd_raw is None:
            continue
        cut = 1 - abs(deb) / abs(raw)
        ok = cut >= 0.8 and nd >= 0.99 * nd_raw
        out.append(f"- MBD {t}: correlation with item length {raw:+.3f} → {deb:+.3f} ({100 * cut:.0f}% cut; target ≥ 80%), "
                   f"NDCG@10 {nd_raw:.4f} → {nd:.4f} (target: within 1%): **{'met' if ok else 'not met'}**.")  # fmt: skip
    for dataset in ("synth", "ml-100k"):
        for task in sorted({r["params"].get("task") for r in rows if r["dataset"] == dataset and r["metric"] == "auc"}):
            a0 = _find(rows, dataset=dataset, metric="auc", task=task, system="ranker")
            a1 = _find(rows, dataset=dataset, metric="auc", task=task, system="ranker_fm_oracle")
            a9 = _find(rows, dataset=dataset, metric="auc", task=task, hit_rate=0.9)
            if None in (a0, a1, a9):
                continue
            gain = a1 - a0
            if gain <= 1e-4:
                out.append(f"- FM, {dataset}/{task}: the oracle gains nothing over no FM ({a0:.4f} → {a1:.4f}); "
                           "the 90%-hit-rate target is moot here (the FM does not help this task at this training size).")  # fmt: skip
                continue
            share = (a9 - a0) / gain
            out.append(f"- FM, {dataset}/{task}: AUC {a0:.4f} (no FM) → {a9:.4f} (90% hits) → {a1:.4f} (oracle): "
                       f"{100 * share:.0f}% of the oracle's gain (target ≥ 90%): **{'met' if share >= 0.9 else 'not met'}**.")  # fmt: skip
    return out
