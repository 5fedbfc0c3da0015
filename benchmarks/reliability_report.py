"""The reliability benchmark's Markdown and timeline plot (``chaos.py`` runs the scenarios).

``.venv/bin/python benchmarks/chaos.py --render`` rebuilds ``docs/benchmarks/reliability.md``
from ``reliability.json`` without running anything.
"""

from __future__ import annotations

from pathlib import Path

from serving_report import fmt

OUT_DIR = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
TIMELINE_PNG = "reliability_timeline.png"


def plot(timeline: list) -> str | None:
    if not timeline:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timeline), 1, figsize=(10, 3.2 * len(timeline)), squeeze=False)
    for ax, part in zip(axes[:, 0], timeline):
        shots = part["shots"]
        ax.scatter([s[0] for s in shots if s[2]], [s[1] for s in shots if s[2]], s=4, label="answered")
        ax.scatter([s[0] for s in shots if not s[2]], [s[1] for s in shots if not s[2]], s=12, c="red", label="failed")
        for name, t in part["kills"]:
            ax.axvline(t, color="k", lw=0.8, ls="--")
            ax.text(t, ax.get_ylim()[1] if shots else 1, f" kill {name}", rotation=90, va="top", fontsize=7)
        ax.set(yscale="log", xlabel="seconds", ylabel="latency ms (with retries)",
               title=f"steady load while replicas are SIGKILLed ({part['replicas']} replica(s) per deployment)")
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    name = TIMELINE_PNG
    fig.savefig(OUT_DIR / name, dpi=110)
    plt.close(fig)
    return name


def write_markdown(report: dict, png: str | None) -> None:
    m = report["machine"]
    lines = [
        "# Reliability (`make chaos`)",
        "",
        f"Command: `{report['command']}`; commit `{report['git_commit']}`; {report['date']}; "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; load average at start "
        f"{m['load_average_at_start']}; wall time {report['wall_s']:.0f} s. Run `{report['run']}`, models "
        f"`{report['models']}`. Figures in `reliability.json`.",
        "",
        "Load goes through `serving.client.RecommendClient` (retries 408/429/500/502/503/504 and dropped "
        "connections, honours `Retry-After`, 30 s deadline); *success* is the share of calls answered 2xx in "
        "the end, *first try* the share that needed no retry. Replicas are SIGKILLed (no draining).",
        "",
        "## Killed replicas under steady load",
        "",
        f"{report['config']['rate_per_s']:.0f} requests/s from {report['config']['concurrency']} client threads. "
        "*During* = calls that began between the kill and Serve reporting the deployment healthy at full "
        "strength again (*replaced*).",
        "",
        "| deployment | replicas | replaced (s) | success during | first try during | p99 during (ms) | p99 after (ms) | FM hit during | FM hit after | hit rate recovered (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["replica_kills"]:
        d, a = r["during"], r["after"]
        lines.append(
            f"| {r['deployment']} | {r['replicas']} | {r['replaced_s']:.1f} | {d['success_rate']:.3f} | "
            f"{d['first_try_rate']:.3f} | {fmt(d['p99_ms'], 0)} | {fmt(a['p99_ms'], 0)} | {fmt(d['fm_hit_rate'], 2)} | "
            f"{fmt(a['fm_hit_rate'], 2)} | {fmt(r['hit_recovered_s'])} |"
        )
    if png:
        lines += ["", f"![latency while replicas are killed]({png})"]
    lines += ["", "## Rolling out a new checkpoint under load", "",
              "| replicas | rollout (s) | success | first try | p99 (ms) | failed statuses | versions answered during |",
              "|---|---|---|---|---|---|---|"]
    for r in report["rollouts"]:
        d = r["during"]
        lines.append(f"| {r['replicas']} | {r['rollout_s']:.1f} | {d['success_rate']:.3f} | {d['first_try_rate']:.3f} | "
                     f"{fmt(d['p99_ms'], 0)} | {d['failed_statuses'] or '-'} | {d['versions']} |")
    o = report["overload"]
    if o:
        lines += ["", "## Overload", "",
                  f"Saturation measured first ({o['saturation_qps']:.1f} 2xx/s), then {o['offered_qps']:.0f} req/s "
                  f"offered open-loop for {o['seconds']:.0f} s ({o['requests']} requests).", "",
                  "| 2xx | shed 429/503 | other 5xx | timeouts | p99 of 2xx (ms) | Serve RSS before / peak / after (MiB) | recovered after (s) |",
                  "|---|---|---|---|---|---|---|",
                  f"| {o['share_2xx']:.3f} | {o['share_shed']:.3f} | {o['responses_5xx_other']} | {o['timeouts']} | "
                  f"{fmt(o['p99_ms_2xx'], 0)} | {o['rss_mb_before']:.0f} / {o['rss_mb_peak']:.0f} / {o['rss_mb_after']:.0f} "
                  f"({o['serve_processes']} processes) | {fmt(o['recovery_s'])} |"]
    f = report["feedback"]
    if f:
        lines += ["", "## Feedback durability", "",
                  f"{f['acked']} events acknowledged in batches of {report['config']['feedback_batch']}; the FeedbackSink "
                  f"was SIGKILLed after batch {f['killed_after_batch']}. Acknowledged events lost: **{f['acked_events_lost']}**; "
                  f"duplicates in the Parquet log: **{f['duplicates']}**; batches that failed even after retries: "
                  f"{f['batches_failed']}."]
    if report["training"]:
        lines += ["", "## Training", "", "| scenario | passed | wall (s) | pytest |", "|---|---|---|---|"]
        for name, t in report["training"].items():
            lines.append(f"| {name} | {t['passed']} | {t['wall_s']:.0f} | {t['pytest']} |")
        lines += ["", "What the tests assert is in tests/training/test_fault_tolerance.py (README, Failure behaviour)."]
    (OUT_DIR / "reliability.md").write_text("\n".join(lines) + "\n")
