"""bench-serve's ``solaris`` part: SOLARIS precompute against the textbook cache, in the same windows.

Three FM modes of one live app (switched through the Ingress's ``user_config``), each sent the
same session traffic (``benchmarks/sessions.py``) in interleaved windows, ``rounds`` rounds of
one window per mode, the order rotated each round:

- ``serve_precompute`` (``fm_mode`` cache): the Predictor precomputes from traffic, feedback and
  the session-start event each session opens with (``serving.precompute``);
- ``serve_reactive_cache`` (``fm_mode`` reactive, Predictor paused): a miss ranks on the
  missing-FM path and the missed pairs are computed and cached for the session
  (``serving.reactive``): compute on miss, keep, no prediction;
- ``serve_no_fm`` (``fm_mode`` off): every request on the missing-FM path (the latency floor).

Every window starts cold (cache cleared, Predictor reset) and each user has one session per
window, so a session's first request can hit only by prediction; the hit rate is split into
first requests and repeats (the client knows which is which). The p99 ratio precompute /
reactive is taken per round (the two windows of a round are a few seconds apart, so they share
the machine's load) and summarised as a geometric mean with a 90% t-interval over rounds.

Quality kept (with ``gain_of``, on the synthetic app whose true preference is known,
``benchmarks/synth_quality.py``): each served user's FM gain Δ (NDCG@10 against the true
preference with the FM for every candidate minus without it, paired in process on the candidates
the windows' requests rank) and per mode the share of it the served hits keep, Σ h·Δ / Σ Δ over
requests (``synth_quality.retained_share``: a 90% bootstrap interval over users).

Rows (``serving`` names of ../shared/specs/benchmark-results.md, all with param ``part``:
``solaris``): ``hit_rate`` (param ``request``: ``first``/``repeat``/``all``), ``p50_ms``,
``p99_ms``, ``responses_non2xx``, ``fm_gain_kept`` (``ci_low``/``ci_high``) per system;
``p99_ratio_vs_reactive_cache`` and ``p99_ratio_vs_no_fm`` with ``ci_low``/``ci_high``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import synth_quality  # benchmarks/synth_quality.py
from inprocess import load_inprocess  # benchmarks/inprocess.py
from results import row  # benchmarks/results.py
from serve_app import ROOT, AppSpec, deploy, handle, newest_ranker_run, newest_run, wait_steady  # benchmarks/serve_app.py
from sessions import PlanResult, session_plan, run_plan  # benchmarks/sessions.py
from synth_quality import TruePreference, retained_share  # benchmarks/synth_quality.py
from traffic import run_load  # benchmarks/traffic.py

SYSTEMS = {"serve_precompute": "cache", "serve_reactive_cache": "reactive", "serve_no_fm": "off"}
PART = "solaris"
T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}
"""Two-sided 90% quantiles of Student's t by degrees of freedom (1.645 past 10 is close enough
at this precision: 11 df gives 1.796)."""


@dataclass(frozen=True)
class SolarisConfig:
    """Sizes of the part.

    Args:
        rounds: interleaved rounds (one window per mode each).
        window_s: seconds of traffic per window.
        sessions_per_s / mean_requests / think_s / lead_s: the session traffic
            (``sessions.session_plan``): about sessions_per_s × mean_requests requests/s.
        warmup_users: users kept out of the plans, asked for before each window (connections and
            handles warm) and so never in a measured session.
        candidates: retrieved and ranked per request.
    """

    rounds: int = 6
    window_s: float = 20.0
    sessions_per_s: float = 20.0
    mean_requests: float = 4.0
    think_s: float = 1.5
    lead_s: float = 1.0
    warmup_users: int = 20
    candidates: int = 50
    timeout_s: float = 10.0
    seed: int = 0


def start_window(url: str, app: AppSpec, cfg: SolarisConfig, mode: str, warm: list[int], quiet_s: float = 1.5) -> float:
    """Switch the live app to ``mode`` and start it cold (bench_serving.start_fm_window says why in
    this order): warm up, pause the Predictor, reset it, and clear the cache until no FM result
    lands in it for ``quiet_s`` (FM batches of the previous window, precomputed or reactive, must
    not land in this one: a round's windows serve the same users), then resume the Predictor only
    for precompute. Returns the seconds waited for a steady app."""
    deploy(app, cfg.candidates, fm_mode=mode)
    steady_s = wait_steady()
    run_load(url, warm, 5, 3, cfg.timeout_s)
    predictor, cache = handle("Predictor"), handle("FMCache")
    predictor.set_paused.remote(True).result()
    predictor.reset.remote().result()
    deadline = time.monotonic() + 60
    while True:
        cache.clear.remote().result()
        time.sleep(quiet_s)
        if cache.summary.remote().result()["entries"] == 0 or time.monotonic() > deadline:
            break
    predictor.reset.remote().result()
    predictor.set_paused.remote(mode != "cache").result()
    return steady_s


def ratio_interval(ratios: list[float]) -> tuple[float | None, float | None, float | None]:
    """(geometric mean, 90% low, 90% high) of per-round ratios: a t-interval on their logs."""
    logs = np.log([r for r in ratios if r and r > 0])
    if len(logs) == 0:
        return None, None, None
    mean = float(logs.mean())
    if len(logs) < 2:
        return math.exp(mean), None, None
    half = T90.get(len(logs) - 1, 1.645) * float(logs.std(ddof=1)) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def window_stats(res: PlanResult) -> dict:
    return {
        "requests": len(res.visits), "first_requests": sum(v.request.first for v in res.visits),
        "p50_ms": res.p(50), "p99_ms": res.p(99), "non2xx": len(res.visits) - len(res.ok()),
        "hit_rate_first": res.hit_rate(first=True), "hit_rate_repeat": res.hit_rate(first=False),
        "hit_rate_all": res.hit_rate(), "session_starts_acked": res.starts_ok,
    }


def paired_gain(index: Any, stage: Any, truth: TruePreference, users: list[int], candidates: int) -> dict[int, float]:
    """user → NDCG@10 with the FM for every candidate minus without it (``index``/``stage``:
    inprocess.load_inprocess's), on the candidates a request ranks (exclude_seen, as the
    windows ask; no live history changes during them, so one number per user)."""
    from serving.ranker import RankQuery
    from serving.retriever import Query

    out = {}
    for user in dict.fromkeys(users):
        answer = index.search([Query(user, candidates)])[0]
        query = [RankQuery(user, answer.item_ids, 10)]
        fm, present = stage.compute_fm(query)
        out[user] = truth.ndcg(user, stage.rank(query, fm, present)[0][0]) - truth.ndcg(user, stage.rank(query, None, None)[0][0])
    return out


def run(url: str, app: AppSpec, users: list[int], cfg: SolarisConfig, rows: list, dataset: str,
        gain_of: Callable[[list[int]], dict[int, float]] | None = None) -> dict:  # fmt: skip
    """The part: ``cfg.rounds`` rounds × the three modes; appends its rows; returns the report.
    ``gain_of``: users → each one's paired FM gain (:func:`paired_gain`); None: no quality figure."""
    warm, pool = users[: cfg.warmup_users], users[cfg.warmup_users :]
    systems = list(SYSTEMS)
    windows: dict[str, list[dict]] = {s: [] for s in systems}
    pooled: dict[str, PlanResult] = {s: PlanResult() for s in systems}
    for r in range(cfg.rounds):
        plan = session_plan(pool, cfg.window_s, cfg.sessions_per_s, cfg.mean_requests, cfg.think_s, cfg.lead_s, cfg.seed + r)
        for system in systems[r % 3 :] + systems[: r % 3]:  # the order rotates: none is always first
            steady_s = start_window(url, app, cfg, SYSTEMS[system], warm)
            load = os.getloadavg()[0]
            res = run_plan(url, plan, cfg.timeout_s)
            stats = {"round": r, "load_average": round(load, 2), "waited_for_steady_s": round(steady_s, 1), **window_stats(res)}
            windows[system].append(stats)
            pooled[system].visits += res.visits
            pooled[system].wall_s += res.wall_s
            print(f"  round {r} {system}: p50 {stats['p50_ms']} p99 {stats['p99_ms']} ms, hit first "
                  f"{stats['hit_rate_first']} repeat {stats['hit_rate_repeat']}, {stats['requests']} requests, "
                  f"load {load:.1f}", flush=True)  # fmt: skip
    out: dict = {"config": cfg.__dict__, "systems": {}, "ratios": {}}
    params = {"part": PART, "traffic": "sessions", "windows": cfg.rounds, "seconds_per_window": cfg.window_s,
              "sessions_per_s": cfg.sessions_per_s, "lead_s": cfg.lead_s}  # fmt: skip
    for system in systems:
        res = pooled[system]
        stats = {
            "p50_ms": res.p(50), "p99_ms": res.p(99), "requests": len(res.visits), "non2xx": len(res.visits) - len(res.ok()),
            "hit_rate": {"first": res.hit_rate(first=True), "repeat": res.hit_rate(first=False), "all": res.hit_rate()},
            "p99_ms_per_window": [w["p99_ms"] for w in windows[system]], "windows": windows[system],
        }
        out["systems"][system] = stats
        if SYSTEMS[system] != "off":
            rows += [row(system, dataset, "hit_rate", stats["hit_rate"][kind], request=kind, **params) for kind in ("first", "repeat", "all")]
        rows += [row(system, dataset, "p50_ms", stats["p50_ms"], **params), row(system, dataset, "p99_ms", stats["p99_ms"], **params),
                 row(system, dataset, "responses_non2xx", stats["non2xx"], of=stats["requests"], **params)]  # fmt: skip
    for name, (a, b) in {"serve_precompute_vs_reactive_cache": ("serve_precompute", "serve_reactive_cache"),
                         "serve_precompute_vs_no_fm": ("serve_precompute", "serve_no_fm"),
                         "serve_reactive_cache_vs_no_fm": ("serve_reactive_cache", "serve_no_fm")}.items():  # fmt: skip
        per_round = [x / y if x and y else None for x, y in zip(out["systems"][a]["p99_ms_per_window"], out["systems"][b]["p99_ms_per_window"])]
        mean, lo, hi = ratio_interval([p for p in per_round if p is not None])
        out["ratios"][name] = {"geomean": mean, "ci90_low": lo, "ci90_high": hi, "per_round": per_round}
        metric = "p99_ratio_vs_" + b.removeprefix("serve_")
        rows.append(row(a, dataset, metric, mean, ci_low=lo, ci_high=hi, interval="90% t over rounds, log scale",
                        per_round=[round(p, 3) if p else None for p in per_round], **params))  # fmt: skip
        print(f"  p99 {a} / {b}: {mean} (90% interval {lo}..{hi}) per round {per_round}", flush=True)
    out["load_average"] = {s: [w["load_average"] for w in windows[s]] for s in systems}
    if gain_of is not None:
        out["quality"] = kept_share(pooled, gain_of, cfg, rows, dataset, params)
    return out


def kept_share(pooled: dict[str, PlanResult], gain_of: Callable[[list[int]], dict[int, float]], cfg: SolarisConfig,
               rows: list, dataset: str, params: dict) -> dict:  # fmt: skip
    """The FM gain of the served users, and per cached mode the share of it its hits kept."""
    served = sorted({v.request.user_id for res in pooled.values() for v in res.ok()})
    gain = gain_of(served)
    deltas = np.asarray(list(gain.values()))
    out: dict = {"users": len(gain), "gain": float(deltas.mean()), "gain_se": float(deltas.std(ddof=1) / math.sqrt(len(deltas))),
                 "users_gaining": int((deltas > 0).sum()), "users_losing": int((deltas < 0).sum()), "kept": {}}  # fmt: skip
    rows.append(row("inprocess", dataset, "fm_ndcg_gain", out["gain"], paired=True, users=len(gain), se=out["gain_se"], **params))
    for system, res in pooled.items():
        if SYSTEMS[system] == "off":
            continue
        hits = [v for v in res.ok() if v.fm_from_cache is not None]
        share, lo, hi = retained_share([v.request.user_id for v in hits], [v.fm_from_cache for v in hits], gain, cfg.seed)
        out["kept"][system] = {"share": share, "ci90_low": lo, "ci90_high": hi, "requests": len(hits)}
        rows.append(row(system, dataset, "fm_gain_kept", share, ci_low=lo, ci_high=hi, interval="90% bootstrap over users",
                        requests=len(hits), note_if_null="the FM gains nothing summed over the served users", **params))  # fmt: skip
        print(f"  {system} keeps {share} of the FM gain (90% interval {lo}..{hi})", flush=True)
    print(f"  FM gain over {len(gain)} served users: {out['gain']:+.4f} ± {out['gain_se']:.4f}", flush=True)
    return out


def part(app: AppSpec, dataset: Path, feedback_dir: Path, which: str, cfg: SolarisConfig, rows: list) -> dict:
    """The part on the ml-100k ``app`` (``which`` "ml-100k") or on the synthetic one ("synth": a
    trained two-tower, ranker and FM on ``data/synth-ranker``, trained first if ``runs/`` has none),
    where each user's FM gain is known and the quality each mode keeps is measured too."""
    import pyarrow.parquet as pq

    from serving.ranking_models import DEFAULT_MODELS_FACTORY

    gain_of = None
    if which == "synth":
        dataset, run_dir, ranker_run = synth_quality.prepare(ROOT, newest_run, newest_ranker_run)
        app = AppSpec(run_dir, feedback_dir.with_name(feedback_dir.name + "-solaris"), DEFAULT_MODELS_FACTORY, ranker_run)
        truth = synth_quality.TruePreference(dataset, ranker_run)
        index, stage = load_inprocess(run_dir, DEFAULT_MODELS_FACTORY, ranker_run)

        def gain_of(users: list[int]) -> dict[int, float]:
            return paired_gain(index, stage, truth, users, cfg.candidates)

    url = deploy(app, cfg.candidates, fm_mode="cache")
    everyone = pq.read_table(dataset / "users.parquet").column(0).to_pylist()
    everyone = np.random.default_rng(cfg.seed).permutation(everyone).tolist()
    out = run(url, app, everyone, cfg, rows, "synth" if which == "synth" else dataset.name, gain_of)
    return out | {"app": {"which": which, "dataset": dataset.name, "run": str(app.run_dir), "models": app.factory,
                          "ranker_run": str(app.ranker_run) if app.ranker_run else None}}  # fmt: skip


def markdown(section: dict) -> list[str]:
    """The part's section of serving.md."""

    def f(v, digits: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    cfg, systems, app = section["config"], section["systems"], section.get("app", {})
    lines = [
        "## SOLARIS against a reactive cache (part `solaris`)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_serving.py {section.get('args') or '--parts solaris'}` (commit "
        f"{section.get('git_commit')}, {section.get('date')}, load average at start {section.get('load_average_at_start')}). "
        f"App: {app.get('dataset')} (index {Path(str(app.get('run'))).name}, models {app.get('models')}"
        f"{', ranker ' + Path(app['ranker_run']).name if app.get('ranker_run') else ''}). Three FM modes of one app, "
        f"{cfg['rounds']} interleaved rounds of one {cfg['window_s']:.0f} s window per mode (order rotated), every window "
        f"cold and sent the same session traffic: {cfg['sessions_per_s']} sessions/s, each a `session_start` /feedback "
        f"event then {cfg['lead_s']} s later the first /recommend, then Poisson({cfg['mean_requests'] - 1:.0f}) more "
        f"requests {cfg['think_s']} s apart on average (exponential); one session per user per window. `serve_reactive_cache` is the "
        "textbook cache: a miss ranks without FM and its pairs are computed and kept (same FM workers, cache and TTL), "
        "nothing predicted.",
        "",
        "| system | hit rate, first requests | hit rate, repeats | hit rate, all | p50 ms | p99 ms | p99 per window | non-2xx |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        hits = s["hit_rate"]
        lines.append(f"| {name} | {f(hits['first'])} | {f(hits['repeat'])} | {f(hits['all'])} | {f(s['p50_ms'], 1)} | "
                     f"{f(s['p99_ms'], 1)} | {', '.join(f(p, 0) for p in s['p99_ms_per_window'])} | {s['non2xx']} of {s['requests']} |")  # fmt: skip
    lines += ["", "| p99 ratio (per round, then geometric mean) | value | 90% interval | per round |", "|---|---|---|---|"]
    for name, r in section["ratios"].items():
        lines.append(f"| {name.replace('_vs_', ' / ')} | {f(r['geomean'])} | {f(r['ci90_low'])}–{f(r['ci90_high'])} | "
                     f"{', '.join(f(p) for p in r['per_round'])} |")  # fmt: skip
    quality = section.get("quality")
    if quality:
        lines += ["", f"Quality kept (true preference, synthetic app): the FM's NDCG@10 gain over the {quality['users']} served "
                  f"users, paired in process, is {quality['gain']:+.4f} ± {quality['gain_se']:.4f} ({quality['users_gaining']} "
                  f"gain, {quality['users_losing']} lose); share of it the served hits keep, Σ h·Δ / Σ Δ over requests "
                  "(90% bootstrap interval over users):", ""]  # fmt: skip
        lines += [f"- {name}: {f(k['share'])} ({f(k['ci90_low'])}–{f(k['ci90_high'])}) over {k['requests']} requests"
                  for name, k in quality["kept"].items()]
    loads = [x for v in section["load_average"].values() for x in v]
    lines += ["", f"Load average over the windows (1 min, at each window's start): {min(loads):.1f}–{max(loads):.1f} on "
              f"{os.cpu_count()} cores.", ""]  # fmt: skip
    return lines


MARK_BEGIN, MARK_END = "<!-- part solaris: begin -->", "<!-- part solaris: end -->"


def splice(md: str, lines: list[str]) -> str:
    """``md`` with the part's section replaced (or appended when it has none)."""
    block = "\n".join([MARK_BEGIN, *lines, MARK_END])
    if MARK_BEGIN in md and MARK_END in md:
        head, rest = md.split(MARK_BEGIN, 1)
        return head + block + rest.split(MARK_END, 1)[1]
    return md.rstrip("\n") + "\n\n" + block + "\n"
