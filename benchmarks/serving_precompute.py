"""The serving benchmark's precompute phases (``bench_serving.py`` phases 3 and 6): the three FM
modes (no FM, SOLARIS precompute, synchronous FM) in interleaved windows on the live app, and the
same on an app over synthetic data whose answers are scored against the generator's truth.

Split out of ``bench_serving.py`` (one concept per file): the saturation, overload and
autoscaling phases stay there; ``serving_stages.py`` also starts its windows with
:func:`start_fm_window`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inprocess import load_inprocess  # benchmarks/inprocess.py
from results import row
from serve_app import AppSpec, deploy, handle, wait_steady  # benchmarks/serve_app.py: the app under test
from serving_report import fmt
import synth_quality  # benchmarks/synth_quality.py
from traffic import LoadResult, Shot, run_load  # benchmarks/traffic.py

if TYPE_CHECKING:
    from bench_serving import BenchConfig

def solaris_summary(modes: dict, rows: list, dataset: str) -> dict:
    """The issue's three SOLARIS targets as numbers (also appended to ``rows``)."""
    pre, off, sync = modes["serve_precompute"], modes["serve_no_fm"], modes["serve_sync_fm"]
    ratio = pre["p99_ms"] / off["p99_ms"] if pre["p99_ms"] and off["p99_ms"] else None
    gain = None
    if None not in (pre["ndcg@10"], off["ndcg@10"], sync["ndcg@10"]) and sync["ndcg@10"] > off["ndcg@10"]:
        gain = (pre["ndcg@10"] - off["ndcg@10"]) / (sync["ndcg@10"] - off["ndcg@10"])
    rows.append(row("serve_precompute", dataset, "p99_ratio_vs_no_fm", ratio, traffic="replay"))
    rows.append(row("serve_precompute", dataset, "fm_gain_retained", gain, traffic="replay",
                    note_if_null="sync FM gained no NDCG over no FM in this window"))
    return {"p99_ratio_vs_no_fm": ratio, "hit_rate": pre["hit_rate"], "fm_gain_retained": gain}


Quality = Callable[[int, int, list[int]], float]
"""NDCG@10 of one answer: (replay event index, user, answered item ids in order) → [0, 1]."""


def mean_quality(shots: list[Shot], quality: Quality) -> float | None:
    """Mean ``quality`` of the answered requests."""
    gains = [quality(s.index, s.user_id, [i["item_id"] for i in s.body["items"]]) for s in shots if s.body is not None]
    return float(np.mean(gains)) if gains else None


def start_fm_window(url: str, app: AppSpec, cfg: BenchConfig, users: list[int], mode: str) -> float:
    """Switch the live app to ``mode`` and make it ready for a measured window; returns the
    seconds spent waiting for a steady app."""
    deploy(app, cfg.candidates, fm_mode=mode)
    # measure a steady app: the previous phase's autoscaled replicas have stopped draining
    steady_s = wait_steady()
    run_load(url, users[:20], 5, 4, cfg.timeout_s)  # unmeasured: connections and handles warm in this mode
    # every window starts cold: no entries, no traffic history; FM work only when it is used.
    # Order matters: the predictor tracks traffic while paused, so unpausing it before the reset
    # lets it dispatch FM work for the warm-up's users, and those results land in the cleared
    # cache (two windows hit 0.98 instead of ~0.87 that way). So: pause, let the Ranker's last
    # signals (every signal_flush_s = 0.2 s) and any in-flight FM batches land, reset, clear, and
    # only then resume.
    predictor = handle("Predictor")
    predictor.set_paused.remote(True).result()
    time.sleep(1.0)
    predictor.reset.remote().result()
    handle("FMCache").clear.remote().result()
    predictor.set_paused.remote(mode != "cache").result()
    return steady_s


def precompute_modes(url: str, app: AppSpec, users: list[int], quality: Quality, qps: float, cfg: BenchConfig,
                     rows: list, dataset: str) -> tuple[dict, dict[int, float]]:  # fmt: skip
    """The three FM modes, ``cfg.mode_rounds`` interleaved rounds each (off, cache, sync, off, ...),
    pooled per mode: on 2 shared cores a single 25 s window's p99 moves by 30% from one window to
    the next, and interleaving spreads that drift over all three modes instead of one."""
    systems = {"serve_no_fm": "off", "serve_precompute": "cache", "serve_sync_fm": "sync"}
    n = int(qps * cfg.mode_s)
    pooled: dict[str, LoadResult] = {system: LoadResult() for system in systems}
    per_round: dict[str, list[dict]] = {system: [] for system in systems}
    for _ in range(cfg.mode_rounds):
        for system, mode in systems.items():
            steady_s = start_fm_window(url, app, cfg, users, mode)
            cache, predictor = handle("FMCache"), handle("Predictor")
            res = run_load(url, users[:n], qps, cfg.mode_s, cfg.timeout_s)
            shares = [s.body["fm_from_cache"] for s in res.ok() if s.body and s.body.get("fm_from_cache") is not None]
            summary = cache.summary.remote().result()
            window = {
                "p50_ms": res.pct(50), "p99_ms": res.pct(99), "waited_for_steady_s": steady_s,
                "hit_rate": float(np.mean(shares)) if mode == "cache" and shares else None,
                "speculation_precision": summary["speculation_precision"] if mode == "cache" else None,
                "staleness_s": summary["hit_age_s"] if mode == "cache" else None,
                "fm_offpath_pairs": summary["inserted"] if mode == "cache" else None,
                "predictor": predictor.summary.remote().result() if mode == "cache" else None,
            }
            per_round[system].append(window)
            pooled[system].shots += res.shots
            pooled[system].wall_s += res.wall_s
            print(f"  {system}: p50 {fmt(res.pct(50))} p99 {fmt(res.pct(99))} hit {window['hit_rate']}", flush=True)
    out, event_hits = {}, {}  # event_hits: replay event → its mean fm_from_cache over the cache-mode windows
    for system, mode in systems.items():
        res, windows = pooled[system], per_round[system]
        ok = res.ok()
        shares = [s.body["fm_from_cache"] for s in ok if s.body and s.body.get("fm_from_cache") is not None]

        def mean_of(key: str) -> float | None:
            values = [w[key] for w in windows if w[key] is not None]
            return float(np.mean(values)) if values else None

        stats = {
            "p50_ms": res.pct(50), "p95_ms": res.pct(95), "p99_ms": res.pct(99),
            "throughput_qps": res.throughput(),
            "hit_rate": float(np.mean(shares)) if mode == "cache" and shares else None,
            "speculation_precision": mean_of("speculation_precision"),
            "staleness_s": mean_of("staleness_s"),
            "ndcg@10": mean_quality(ok, quality),
            "responses_non2xx": len(res.shots) - len(ok),
            "windows": len(windows),
            "p99_ms_per_window": [w["p99_ms"] for w in windows],
        }
        if mode == "cache":
            stats["fm_offpath_pairs"] = sum(w["fm_offpath_pairs"] for w in windows)
            stats["predictor"] = windows[-1]["predictor"]
            # misses are mostly whole requests (a user's first in the window), not scattered pairs
            stats["requests_all_hit"] = float(np.mean([h == 1.0 for h in shares])) if shares else None
            stats["requests_no_hit"] = float(np.mean([h == 0.0 for h in shares])) if shares else None
            per_event: dict[int, list[float]] = {}
            for s in ok:
                if s.body and s.body.get("fm_from_cache") is not None:
                    per_event.setdefault(s.index, []).append(s.body["fm_from_cache"])
            event_hits = {i: float(np.mean(v)) for i, v in per_event.items()}
        out[system] = stats
        for metric, value in stats.items():
            if metric not in ("predictor", "p99_ms_per_window"):
                rows.append(row(system, dataset, metric, value, offered_qps=qps, traffic="replay",
                                seconds=cfg.mode_s * cfg.mode_rounds))
    deploy(app, cfg.candidates, fm_mode="cache")
    handle("Predictor").set_paused.remote(False).result()
    return out, event_hits


def synth_phase(url: str, runs: tuple[Path, Path, Path], arrivals: list[int], feedback_dir: Path, cfg: BenchConfig,
                qps: float, rows: list) -> dict:  # fmt: skip
    """Phase 6: phase 3's three FM modes on the app redeployed over a two-tower + ranker trained on
    synthetic data, every answer scored by NDCG@10 against the generator's true preference
    (``synth_quality.TruePreference``). Traffic: the synthetic users in ``arrivals``' pattern
    (ml-100k's replay; ``synth_quality.session_traffic`` says why). The FM's gain is measured
    paired in process per user over ``synth_population`` users (a live window's few hundred
    requests cannot resolve a gain of ~0.01), and the share precompute keeps is the live hits
    weighted by it (``synth_quality.retained_share``)."""
    import pyarrow.parquet as pq

    from serving.ranking_models import DEFAULT_MODELS_FACTORY

    dataset, run_dir, ranker_run = runs
    truth = synth_quality.TruePreference(dataset, ranker_run)
    everyone = pq.read_table(dataset / "users.parquet", columns=["user_id"]).column(0).to_pylist()
    rng = np.random.default_rng(cfg.seed)
    population = rng.choice(everyone, min(cfg.synth_population, len(everyone)), replace=False).tolist()
    users = synth_quality.session_traffic(arrivals, population, cfg.seed)
    app = AppSpec(run_dir, feedback_dir.with_name(feedback_dir.name + "-synth"), DEFAULT_MODELS_FACTORY, ranker_run)
    deploy(app, cfg.candidates, fm_mode="cache")

    def true_quality(_i: int, user: int, ids: list[int]) -> float:
        return truth.ndcg(user, ids)

    modes, hits = precompute_modes(url, app, users, true_quality, qps,
                                   replace(cfg, mode_rounds=cfg.synth_mode_rounds, mode_s=cfg.synth_mode_s), rows, "synth")  # fmt: skip
    index, stage = load_inprocess(run_dir, DEFAULT_MODELS_FACTORY, ranker_run)
    gain = synth_quality.paired_gain(index, stage, truth, population, cfg.candidates)
    deltas = np.asarray(list(gain.values()))
    served = sorted(hits)
    share, lo, hi = synth_quality.retained_share([users[i] for i in served], [hits[i] for i in served], gain, cfg.seed)
    paired = {"users": len(gain), "gain": float(deltas.mean()), "gain_se": float(deltas.std() / np.sqrt(len(deltas))),
              "users_gaining": int((deltas > 0).sum()), "users_losing": int((deltas < 0).sum()),
              "requests": len(served), "distinct_request_users": len({users[i] for i in served}),
              "gain_retained": share, "gain_retained_p5": lo, "gain_retained_p95": hi}  # fmt: skip
    print(f"  paired in-process over {len(gain)} users: FM gain {paired['gain']:+.4f} ± {paired['gain_se']:.4f}; "
          f"kept by the live hits: {share} (90% interval {lo}..{hi})", flush=True)
    rows += [
        row("inprocess", "synth", "fm_ndcg_gain", paired["gain"], paired=True, users=len(gain), se=paired["gain_se"]),
        row("serve_precompute", "synth", "fm_gain_retained_paired", share, requests=len(served), p5=lo, p95=hi,
            note_if_null="no FM gain on the served users"),
    ]
    return {"run": str(run_dir), "ranker_run": str(ranker_run), "precompute": modes,
            "solaris": solaris_summary(modes, rows, "synth"), "fm_quality_paired": paired}  # fmt: skip
