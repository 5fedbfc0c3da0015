"""The serving benchmark's report: ``serving.md`` and its plots, from the rows and figures
``bench_serving.py`` measured (kept apart so the benchmark reads as its phases)."""

from __future__ import annotations

from pathlib import Path

PARTS = ("main", "solaris")
"""bench_serving's ``--parts``: ``main`` (phases 1-6) and ``solaris`` (benchmarks/solaris_windows.py)."""
RUN_STAMP = ("git_commit", "date", "command")


def part_of(r: dict) -> str:
    """Which part measured a row (rows written before parts existed carry no tag: ``main``)."""
    return r["params"].get("part", "main")


def merge_parts(previous: dict | None, fresh: dict, parts: list[str]) -> dict:
    """serving.json after a run of ``parts``: ``fresh``'s rows plus ``previous``'s rows of the other
    parts; the sections (top-level keys) of a part not run are kept from ``previous``, and
    ``runs`` says per part the commit, date and load it was measured with."""
    def stamp(report: dict) -> dict:
        return {k: report.get(k) for k in RUN_STAMP} | {
            "load_average_at_start": report.get("machine", {}).get("load_average_at_start")}

    if previous is None:
        return fresh | {"runs": {part: stamp(fresh) for part in parts}}
    runs = dict(previous.get("runs") or {"main": stamp(previous)})
    runs.update({part: stamp(fresh) for part in parts})
    kept = [r for r in previous["rows"] if part_of(r) not in parts]
    if "main" in parts:
        merged = fresh | {k: v for k, v in previous.items() if k == "solaris_windows" and "solaris" not in parts}
    else:  # the main sections, and the stamp at the top, stay those of the run that measured them
        merged = previous | {k: v for k, v in fresh.items() if k == "solaris_windows"}
    return merged | {"rows": kept + fresh["rows"], "runs": dict(sorted(runs.items()))}


def plots(throughput: dict, samples: list[dict], out_dir: Path) -> list[str]:
    """serving_latency.png (the bisected saturation sweeps, rayrec and the no-Ray baseline) and
    serving_replicas.png (the step load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    top = 1.0
    for (name, system), style in zip(throughput["systems"].items(), ("o", "s")):
        levels = sorted(system["levels"], key=lambda lv: lv["offered_qps"])
        offered = [lv["offered_qps"] for lv in levels]
        top = max([top, *offered])
        ax[0].plot(offered, [lv["achieved_qps"] for lv in levels], style + "-", label=f"{name} (sat. {system['saturation_qps']:.0f})")
        ax[1].plot(offered, [lv["p50_ms"] for lv in levels], style + "-", label=f"{name} p50")
        ax[1].plot(offered, [lv["p99_ms"] for lv in levels], style + "--", label=f"{name} p99")
    ax[0].plot([0, top], [0, top], "k:", lw=0.8, label="offered")
    ax[0].set(xlabel="offered load (req/s)", ylabel="2xx per s", title="throughput (open loop, replay)")
    ax[0].legend(fontsize=8)
    ax[1].set(xlabel="offered load (req/s)", ylabel="ms", yscale="log", title="latency of the 2xx")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "serving_latency.png", dpi=110)
    names.append("serving_latency.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for name in ("Ingress",):
        ax.step([s["t"] for s in samples], [s.get(name, 0) for s in samples], where="post", label=name)
    ax.set(xlabel="seconds", ylabel="running replicas", title="replicas under a step load")
    ax.legend(loc="upper left")
    load = ax.twinx()
    load.step([s["t"] for s in samples], [s["offered_qps"] for s in samples], "k:", where="post")
    load.set_ylabel("offered req/s (dotted)")
    fig.tight_layout()
    fig.savefig(out_dir / "serving_replicas.png", dpi=110)
    names.append("serving_replicas.png")
    plt.close(fig)
    return names


def write_markdown(report: dict, modes: dict, over: dict, pngs: list[str], out_dir: Path) -> None:
    """serving.md from the report dict (every figure in it is also in serving.json)."""
    rows = report["rows"]

    def value(system: str, metric: str, **match) -> str:
        for r in rows:
            if r["system"] == system and r["metric"] == metric and all(r["params"].get(k) == v for k, v in match.items()):
                return "n/a" if r["value"] is None else f"{r['value']:g}"
        return "n/a"

    tp = report["throughput"]
    sat_serve = tp["systems"]["serve"]["saturation_qps"]
    sat_base = tp["systems"]["fastapi_inprocess"]["saturation_qps"]
    seq = tp["sequential"]
    level_rows = [
        f"| {name} | {lv['offered_qps']:g} | {lv['achieved_qps']:.1f} | {lv['share_2xx']:.3f} | {fmt(lv['p50_ms'])} | "
        f"{fmt(lv['p99_ms'])} | {'yes' if lv['kept_up'] else 'no'} |"
        for name, system in tp["systems"].items() for lv in system["levels"]
    ]
    lines = [
        "# Serving benchmark",
        "",
        f"Command: `{report['command']}`. Date {report['date']}, commit {report['git_commit']}, machine "
        f"{report['machine']['cpu']} ({report['machine']['cores']} cores, shared: load average "
        f"{report['machine']['load_average_at_start']} at start, so absolute latencies include other "
        f"jobs' CPU use), Ray {report['versions']['ray']}. Run: `" + report["run"] + "`; ranker/FM: `"
        + report["models"] + "`.",
        "",
        "All figures are over real loopback HTTP with an open-loop asyncio client (`benchmarks/lean_http.py`: 0.19 ms of CPU per request at 1,680 req/s, aiohttp 0.33) running on the same "
        "2 cores as the servers. Durations are kept short to fit the run in ~20 minutes: each load level "
        f"runs at most {report['config']['level_s']} s, each precompute mode {report['config']['mode_s']} s; the "
        f"overload burst {report['config']['overload_s']} s.",
        "",
        "## Saturation: rayrec vs the same work behind one plain FastAPI process",
        "",
        "The app as shipped (`ServingSettings` defaults, FM mode `cache`; 2 Ingress replicas (one per core), each retrieving and "
        "ranking in process, reached through HAProxy: `serving/ingress.py`, `serving/serve_env.py`) and "
        "`fastapi_inprocess`: the same `RetrievalIndex` + `RankingStage` on the same run in one uvicorn process "
        "with no Ray (`benchmarks/fastapi_baseline.py`; one retrieval and one ranking pass per request, no FM). "
        "Same open-loop client, same replayed requests, same cores, level by level in turn. A level is kept up "
        "with when >= 95% of the requests sent are answered 2xx with p99 <= 1 s; each sweep doubles from "
        f"{report['config']['start_qps']:g} req/s until a level fails, then bisects until the bounds are within "
        f"±{100 * report['config']['tolerance']:.0f}% of their midpoint; saturation is the achieved rate at the "
        f"highest level kept up with. Each level runs {report['config']['level_s']:g} s.",
        "",
        "| system | offered req/s | achieved 2xx/s | share 2xx | p50 ms | p99 ms | kept up |",
        "|---|---|---|---|---|---|---|",
        *level_rows,
        "",
        f"Saturation: rayrec **{sat_serve:.1f} req/s** (kept up at {tp['systems']['serve']['kept_up_qps']:g}, not at "
        f"{tp['systems']['serve']['failed_qps']}); fastapi_inprocess **{sat_base:.1f} req/s** (kept up at "
        f"{tp['systems']['fastapi_inprocess']['kept_up_qps']:g}, not at {tp['systems']['fastapi_inprocess']['failed_qps']}); "
        f"ratio {sat_serve / sat_base if sat_base else float('nan'):.2f} (target >= 1).",
        "",
        "![latency](serving_latency.png)",
        "",
        "Sequential requests (one at a time, 3 interleaved blocks of 50 per system, same users):",
        "",
        "| system | p50 ms | p99 ms |",
        "|---|---|---|",
        *[f"| {name} | {fmt(v['p50_ms'])} | {fmt(v['p99_ms'])} |" for name, v in seq.items()],
        "",
        f"rayrec's sequential p50 minus in-process p50: {seq['serve']['p50_ms'] - seq['inprocess']['p50_ms']:.1f} ms "
        "(target <= 10 ms; in-process is retrieve + rank in the benchmark's own process, FM off; rayrec's "
        "includes HTTP, HAProxy and the FM cache read).",
        "",
        "## Serve overhead (sequential, FM off)",
        "",
        f"In-process retrieve + rank p50 {value('inprocess', 'p50_ms')} ms; through Serve (HAProxy → "
        f"Ingress, retrieving and ranking in process) p50 {value('serve', 'p50_ms', sequential=True)} ms; ratio "
        f"**{value('serve', 'overhead_ratio')}**.",
        "",
        "## Speculative precompute (SOLARIS): on vs off vs synchronous FM",
        "",
        "| system | fm_mode | p50 ms | p99 ms | 2xx/s | hit rate | precision | staleness s | NDCG@10 | non-2xx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, mode in (("serve_no_fm", "off"), ("serve_precompute", "cache"), ("serve_sync_fm", "sync")):
        m = modes[system]
        lines.append(
            f"| {system} | {mode} | {fmt(m['p50_ms'])} | {fmt(m['p99_ms'])} | {fmt(m['throughput_qps'])} | "
            f"{fmt(m['hit_rate'], 3)} | {fmt(m['speculation_precision'], 3)} | {fmt(m['staleness_s'])} | "
            f"{fmt(m['ndcg@10'], 4)} | {m['responses_non2xx']} |"
        )
    pre = modes["serve_precompute"]
    lines += [
        "",
        f"Each mode runs {report['config']['mode_rounds']} windows of {report['config']['mode_s']} s, "
        "interleaved (off, cache, sync, off, ...) and pooled; p99 per window: "
        + "; ".join(f"{name} {', '.join(fmt(v) for v in modes[name]['p99_ms_per_window'])}"
                    for name in ("serve_no_fm", "serve_precompute", "serve_sync_fm"))
        + " ms. Each window starts cold (empty cache, a predictor that has seen no traffic) and replays the "
        "same events, after the app is steady (the previous phase's autoscaled replicas have "
        "drained; 20 unmeasured requests warm connections and handles); the predictor is paused in the off and sync modes. Hit rate is the mean "
        "`fm_from_cache` of the answers; precision is the share of precomputed pairs read at least "
        "once (cache telemetry); staleness is the mean age of the entries read. FM pairs computed off "
        f"the request path: {pre.get('fm_offpath_pairs')}; predictor: {pre.get('predictor')}.",
        "",
        "Reading it: the replay sends each event's user once per event, so a user's first request in "
        "the window misses (the predictor has not seen them yet) and later ones hit once the workers "
        "caught up; precision is below 1 when a user does not come back within the window. "
        f"p99 with precompute / p99 without FM: {fmt(report['solaris']['p99_ratio_vs_no_fm'], 3)} "
        "(issue target <= 1.2); hit rate target >= 0.8. NDCG@10 is of the event's own item among the "
        "10 answers (`exclude_seen=false`, since replayed events include rated items); share of the "
        "synchronous FM's NDCG gain kept with precompute, from the live windows: "
        f"{fmt(report['solaris']['fm_gain_retained'], 3)} (target >= 0.9). "
        + _paired_note(report.get("fm_quality_paired"), pre)
        + (" The ranker and FM here are the stand-ins, so NDCG says nothing about ranking quality."
           if report["stand_in"] else ""),
        "",
        *_synth_section(report),
        f"## Overload: {over['offered_qps']:.0f} req/s ({report['config']['overload_factor']}x saturation) "
        f"for {report['config']['overload_s']} s",
        "",
        f"{over['requests']} requests scheduled at {over['offered_qps']:.0f} req/s; sending and answering them took "
        f"{over['requests'] * over['share_2xx'] / over['goodput_qps']:.0f} s (the open-loop client, on the same 2 cores, "
        f"fell behind its schedule: {over['goodput_qps'] / over['share_2xx']:.0f} req/s actually offered on average). "
        f"{100 * over['share_2xx']:.1f}% answered 2xx, {100 * over['share_shed']:.1f}% shed with 429/503 "
        f"({over['shed_without_retry_after']} of them without Retry-After), {over['responses_5xx']} other 5xx, "
        f"{over['timeouts']} client timeouts/408 (timeout {report['config']['timeout_s']} s); p99 of the 2xx "
        f"{fmt(over['p99_ms_2xx'])} ms. Goodput {over['goodput_qps']:.1f} 2xx/s = "
        f"**{fmt(over['goodput_share_of_saturation'], 3)}** of saturation (target >= 0.9). Recovery (five 200s "
        f"in a row, each under 1 s, after the burst): {fmt(over['recovery_s'])} s (target <= 2 s). Resident memory "
        f"of the Serve processes (replicas, controller, HAProxy): {over['serve_rss_mib']['before']:.0f} MiB before, "
        f"{over['serve_rss_mib']['after']:.0f} MiB at the end of the burst, {over['serve_rss_mib']['recovered']:.0f} "
        "MiB 5 s after recovery.",
        "",
        "## Autoscaling under a step load",
        "",
        f"Offered load {report['config']['step'][0]} → {report['step_high_qps']} "
        f"({report['config']['step_over_saturation']}x saturation) → "
        f"{report['config']['step'][0]} req/s for {report['config']['step'][2]} / {report['config']['step'][3]} / "
        f"{report['config']['step'][4]} s; the shipped autoscaling settings (target 16 ongoing requests per replica, "
        "upscale delay 5 s, downscale delay 30 s, look-back 15 s) except max_replicas 3 instead of 2 (the one "
        "non-default of the run: 2 is one replica per core here; this phase shows the autoscaler), "
        "starting from a steady app. "
        f"Peak running replicas: {report['peak_replicas']}.",
        "",
        "![replicas](serving_replicas.png)",
        "",
        "Machine-readable rows: `serving.json`.",
    ]
    (out_dir / "serving.md").write_text("\n".join(lines) + "\n")


def fmt(v, digits: int = 1) -> str:
    """A number to `digits` decimals, or "n/a"."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def _paired_note(paired: dict | None, pre: dict) -> str:
    """The paired in-process FM quality check and how whole the cache misses were."""
    if not paired:
        return ""
    share = (f"Requests with every candidate's FM from the cache: {fmt(pre.get('requests_all_hit'), 3)}; with none: "
             f"{fmt(pre.get('requests_no_hit'), 3)} (a user's first request), so the kept share of any FM gain is "
             "about the hit rate. ")  # fmt: skip
    return share + (
        f"Paired in-process on the same {paired['events']} events (each event's candidates ranked with no FM and "
        f"with the FM for every candidate): NDCG@10 {paired['ndcg_off']:.4f} → {paired['ndcg_sync']:.4f}, gain "
        f"{paired['gain']:+.4f} ± {paired['gain_se']:.4f} (standard error); the FM changes the NDCG in {paired['lists_changed']} "
        f"of {paired['events']} events. Share kept at the served hit pattern: {fmt(paired['gain_retained'], 3)}"
        + (" (not reported: the gain is within twice its standard error, so the replay's event-item NDCG cannot "
           "see this FM; the next section measures it on synthetic data, where every answered item has a known true preference)."
           if paired["gain_retained"] is None else ".")
    )



def _synth_section(report: dict) -> list[str]:
    """Phase 6: the SOLARIS modes on the synthetic app, NDCG@10 against the true preference."""
    synth = report.get("synth")
    if not synth:
        return []
    modes, paired, solaris = synth["precompute"], synth["fm_quality_paired"], synth["solaris"]
    lines = [
        "## SOLARIS quality on synthetic data (true preference known)",
        "",
        f"The same three modes, {report['config']['synth_mode_rounds']} window(s) of {report['config']['synth_mode_s']} s "
        "each, on the app "
        f"redeployed over a two-tower (`{Path(synth['run']).name}`, configs/synth-two-tower.yaml) and a ranker "
        f"with MBD and the FM (`{Path(synth['ranker_run']).name}`, configs/synth-ranker.yaml) trained on "
        "`data/synth-ranker` (3,000 users, 2,000 items; the generator plants a short-term intent term only a model "
        "over the ordered history sees). Traffic: ml-100k's replay with each of its users replaced by a synthetic "
        f"one (drawn from {paired['users']} users), so requests come in real sessions (the generator's own log has "
        "none). Each answer's NDCG@10 is scored against the generator's preference σ(z̄) of every answered item, "
        "given the user's newest history item (what the FM reads); the ideal is the user's best 10 of the "
        "catalogue (`benchmarks/synth_quality.py`).",
        "",
        "| system | fm_mode | p50 ms | p99 ms | hit rate | NDCG@10 (true preference) | non-2xx |",
        "|---|---|---|---|---|---|---|",
    ]
    for system, mode in (("serve_no_fm", "off"), ("serve_precompute", "cache"), ("serve_sync_fm", "sync")):
        m = modes[system]
        lines.append(f"| {system} | {mode} | {fmt(m['p50_ms'])} | {fmt(m['p99_ms'])} | {fmt(m['hit_rate'], 3)} | "
                     f"{fmt(m['ndcg@10'], 4)} | {m['responses_non2xx']} |")  # fmt: skip
    lines += [
        "",
        f"The FM's gain, paired in process over the {paired['users']} users (each user's candidates ranked with "
        f"no FM and with the FM for every candidate): NDCG@10 {paired['gain']:+.4f} ± {paired['gain_se']:.4f} "
        f"({paired['users_gaining']} users gain, {paired['users_losing']} lose). Share of it kept by precompute, "
        f"each live request's cache hit share weighted by its user's gain over {paired['requests']} requests of "
        f"{paired['distinct_request_users']} users: **{fmt(paired['gain_retained'], 3)}** (90% bootstrap interval "
        f"over users {fmt(paired['gain_retained_p5'], 3)} to {fmt(paired['gain_retained_p95'], 3)}; target >= 0.9). "
        f"The live windows' own ratio, (cache − off) / (sync − off) of the NDCG column: "
        f"{fmt(solaris['fm_gain_retained'], 3)}; the two agree because the windows replay the same requests and a "
        "user's answer in the off and sync modes depends on the user only (`exclude_seen=false`). The interval is "
        "wide because a few users make most requests (ml-100k's sessions) and their gains differ in sign; every "
        "request was either all hits or, a user's first, all misses, and a whole hit ranks exactly as sync "
        "(tests/serving/test_ranking.py), so the kept share is the hit rate weighted by each user's gain.",
        "",
    ]
    return lines
