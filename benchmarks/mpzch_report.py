"""The MPZCH benchmark's Markdown and plots, from its JSON alone (``bench_mpzch.py`` measures).

``.venv/bin/python benchmarks/bench_mpzch.py --render`` rebuilds ``docs/benchmarks/mpzch.md``
from ``mpzch.json`` without measuring anything.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "benchmarks"
COMMAND = ".venv/bin/python benchmarks/bench_mpzch.py"
IMAGES = ["mpzch_collisions.png", "mpzch_churn.png"]
Row = dict[str, Any]


def plot(collision_curves: dict, stale_curves: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, dataset in zip(axes, ("random63", "zipf-churn")):
        for (ds, system), points in sorted(collision_curves.items()):
            if ds == dataset:
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=system)
        ax.set_title(f"{dataset}: IDs sharing a row")
        ax.set_xlabel("load (distinct IDs / rows)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("colliding_id_share (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT_DIR / "mpzch_collisions.png", dpi=110)
    names.append("mpzch_collisions.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for eviction, points in stale_curves.items():
        label = "TTL eviction (policy 0)" if eviction == "ttl" else "no eviction"
        axes[0].plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
        axes[1].plot([p[0] for p in points], [100 * p[2] for p in points], marker="o", label=label)
    axes[0].set_title("rows held by expired IDs")
    axes[0].set_ylabel("stale_row_share (%)")
    axes[1].set_title("this hour's IDs without their own row")
    axes[1].set_ylabel("no_own_slot_share (%)")
    for ax in axes:
        ax.set_xlabel("hour of the churning stream")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_DIR / "mpzch_churn.png", dpi=110)
    names.append("mpzch_churn.png")
    plt.close(fig)
    return names


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _find(rows: list[Row], **match) -> Row | None:
    params = match.pop("params", {})
    for row in rows:
        if all(row[k] == v for k, v in match.items()) and all(row["params"].get(k) == v for k, v in params.items()):
            return row
    return None


def markdown(report: dict, images: list[str], seconds: float) -> str:
    cfg = SimpleNamespace(**report["config"])  # the BenchConfig the numbers were measured with
    rows = report["rows"]
    lines = [
        "# MPZCH benchmark (rayrec CPU insert kernel)",
        "",
        f"Command: `{COMMAND}` (`make bench-mpzch`). Date: {report['date']}. Runtime: {seconds:.0f} s.",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB, no GPU; load average at start "
        f"{report['machine']['load_average_at_start']} (other jobs shared these cores; throughput "
        "figures move with that load, collision figures do not). Versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        f"Table: {cfg.rows:,} rows, batches of {cfg.batch:,} IDs. Generated from the same run as "
        "`mpzch.json`; do not edit by hand.",
        "",
        "## Colliding IDs by load",
        "",
        "`colliding_id_share`: share of distinct IDs whose row also holds another distinct ID, after the "
        "whole stream was inserted (mpzch: the slot fbgemm's readonly kernel returns; sorted MCH: its "
        "eval remap after one DistanceLFU admission pass over the stream). In parentheses for mpzch: "
        "`no_own_slot_share`, the IDs that fell back to a shared row.",
        "",
    ]
    for dataset in ("random63", "zipf-churn"):
        header = "| load | modulo | " + " | ".join(f"mpzch mp{m}" for m in cfg.max_probes) + " | sorted MCH |"
        lines += [f"**{dataset}**", "", header, "|" + "---|" * (3 + len(cfg.max_probes))]
        for load in cfg.loads:
            base = {"dataset": dataset, "metric": "colliding_id_share"}
            cells = [_pct(_find(rows, system="modulo", params={"load": load}, **base)["value"])]
            for m in cfg.max_probes:
                share = _find(rows, system="mpzch", params={"load": load, "max_probe": m}, **base)["value"]
                own = _find(rows, system="mpzch", dataset=dataset, metric="no_own_slot_share",
                            params={"load": load, "max_probe": m})["value"]
                cells.append(f"{_pct(share)} ({_pct(own)})")
            cells.append(_pct(_find(rows, system="sorted_mch", params={"load": load}, **base)["value"]))
            lines.append(f"| {load} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"![collisions]({images[0]})", ""]

    lines += [
        "## Throughput (IDs/s, 1 thread, median batch unless marked amortized)",
        "",
        "Table at load 0.8; each batch holds 80% present and 20% new IDs (inserts add the new ones, so the "
        "insert rows end near load 0.85). `mpzch lookup` is rayrec's op with `readonly=True`.",
        "",
        "| system | mode | setting | IDs/s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row["metric"] == "ids_per_s":
            p = row["params"]
            setting = ", ".join(f"{k}={p[k]}" for k in ("max_probe", "eviction", "timing") if k in p) or "-"
            lines.append(f"| {row['system']} | {p['mode']} | {setting} | {row['value'] / 1e6:.2f} M |")
    lines.append("")

    lines += [
        "## Stale rows under churn",
        "",
        f"A {cfg.stale_hours}-hour Zipf stream in which every ID lives {cfg.stale_ttl} hours and about 0.6 × rows IDs are "
        f"alive at once; TTL = {cfg.stale_ttl} h, max_probe 128. `stale` = rows held by an ID whose expiry "
        "passed (expiry < hour, the kernel's test); `no own row` = this hour's distinct IDs without their own row.",
        "",
        "| hour | stale, TTL eviction | stale, no eviction | no own row, TTL | no own row, none |",
        "|---|---|---|---|---|",
    ]
    for h in range(cfg.stale_hours):
        cells = []
        for metric in ("stale_row_share", "no_own_slot_share"):
            for eviction in ("ttl", "none"):
                cells.append(_pct(_find(rows, system="mpzch", metric=metric,
                                        params={"eviction": eviction, "hour": h})["value"]))
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    lines += ["", f"![churn]({images[1]})", ""]

    lines += [
        "## Model quality",
        "",
        "The same two-tower (configs/ml100k.yaml, same seed) trained twice on 2 Ray Train workers with",
        "fewer rows than ids; test split, leave-one-out, full ranking, seen items masked.",
        "",
        "| system | metric | value | note |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row["metric"] in ("recall@10", "ndcg@10"):
            value = "null" if row["value"] is None else f"{row['value']:.4f}"
            p = row.get("params", {})
            note = row.get("note") or (f"max_probe {p.get('max_probe')}, {p.get('user_rows')} user / {p.get('item_rows')} item rows "
                                        f"for 943 users / 1,682 items, {p.get('epochs')} epochs; "
                                        f"item fallbacks in the last epoch: {p.get('item_fallbacks_last_epoch')}")
            lines.append(f"| {row['system']} | {row['metric']} | {value} | {note} |")
    lines.append("")
    return "\n".join(lines)
