"""The ``days`` part's section of docs/benchmarks/continual.md, from the JSON rows alone.

Why a module of its own: bench_continual.py renders the serving parts; this one renders
:mod:`continual_days`' rows (mean ± SE per arm and day, paired differences, compute, TTL vs
none) and says in words which of issue #29's claims held. A claim is read from the paired
differences (same stream, same seed): "above frozen beyond its interval" is a difference more
than twice its SE; "within one SE of the daily retrain" is a difference no larger than its SE.
"""

from __future__ import annotations

from typing import Optional

DATASET = "synth-churn"
ARMS = ("frozen", "continual", "daily_retrain", "continual_no_eviction")
LABEL = {"popularity": "popularity", "random": "random", "frozen": "frozen", "continual": "continual (TTL)", "daily_retrain": "daily full retrain",
         "continual_no_eviction": "continual, no eviction"}
METRIC_LABEL = {"true_recall@10": "Recall@10 vs true top 10", "true_ndcg@10": "NDCG@10, true preference as gain",
                "event_recall@10": "Recall@10, next-day event", "event_ndcg@10": "NDCG@10, next-day event",
                "cold_item_share@10": "cold-item share of the top 10"}


TARGETS = {"true_": "true_pref", "event_": "next_day_event"}


def spec_name(key: str) -> tuple[str, dict]:
    """A record key as the results spec names it: ``true_recall@10`` is metric ``recall@10`` with
    param ``target=true_pref``, ``event_ndcg@10_minus`` is ``ndcg@10_minus`` with
    ``target=next_day_event``; any other key is its own name."""
    for prefix, target in TARGETS.items():
        if key.startswith(prefix):
            return key[len(prefix):], {"target": target}
    return key, {}


def pick(rows: list[dict], key: str, day, stat: str = "mean", **params) -> Optional[dict]:
    """The one ``days`` row of record key ``key`` on ``day`` whose params include ``params``."""
    metric, target = spec_name(key)
    params = {**params, **target}
    for r in rows:
        p = r["params"]
        if (r["dataset"] == DATASET and p.get("part") == "days" and r["metric"] == metric and p.get("day") == day
                and p.get("stat") == stat and all(p.get(k) == v for k, v in params.items())):
            return r
    return None


def cell(rows: list[dict], metric: str, day, digits: int = 4, **params) -> str:
    """``mean ± se`` of one figure (``-`` where absent)."""
    mean, se = pick(rows, metric, day, "mean", **params), pick(rows, metric, day, "se", **params)
    if mean is None:
        return "-"
    spread = f" ± {se['value']:.{digits}f}" if se and se["value"] is not None else ""
    return f"{mean['value']:.{digits}f}{spread}"


def verdict(rows: list[dict], metric: str, other: str) -> str:
    """Plain words on ``continual - other`` of ``metric`` over all scored days."""
    mean, se = pick(rows, f"{metric}_minus", "after_0", minus=other), pick(rows, f"{metric}_minus", "after_0", "se", minus=other)
    if mean is None or se is None or se["value"] is None:
        return "one seed: no verdict"
    m, s = mean["value"], se["value"]
    if other == "daily_retrain":
        held = abs(m) <= s
        if held:
            return f"{m:+.4f} ± {s:.4f}: **within one SE** of the daily retrain"
        return f"{m:+.4f} ± {s:.4f}: **not within one SE**: " + (
            f"continual is ahead of the daily retrain by {m / s:.1f} SE" if m > 0 else
            f"the daily retrain is ahead by {-m / s:.1f} SE")
    if s == 0:
        return f"{m:+.4f} (no spread over seeds)"
    if m > 2 * s:
        return f"{m:+.4f} ± {s:.4f}: **above {LABEL[other]}** beyond twice the SE ({m / s:.1f} SE)"
    if m < -2 * s:
        return f"{m:+.4f} ± {s:.4f}: **below {LABEL[other]}** ({-m / s:.1f} SE)"
    return f"{m:+.4f} ± {s:.4f}: **not separated** from {LABEL[other]} (within twice the SE)"


def markdown_section(rows: list[dict], details: Optional[dict]) -> list[str]:
    """The report's ``days`` section (empty when the JSON has no ``days`` rows)."""
    rows = [r for r in rows if r["dataset"] == DATASET and r["params"].get("part") == "days"]
    if not rows:
        return []
    p = rows[0]["params"]
    days = sorted({r["params"]["day"] for r in rows if isinstance(r["params"]["day"], int)})
    lines = [
        "## Quality over simulated days: continual vs frozen vs a daily full retrain",
        "",
        f"One churning synthetic stream per seed ({p['users']:,} users, {p['items']:,} items of which 70% are born "
        f"during the stream, {p['events_per_day']:,} exposures a day; benchmarks/churn_days.py), {len(days)} training "
        f"days, each arm scored after day d on day d+1; mean ± SE over {p['seeds']} seeds (the same streams for "
        "every arm). "
        + ("The events are the clicked exposures, each clicked with probability its true preference σ(z) "
           "(`churn_days.read_stream`): what `/feedback` trains on, and the only way the hidden item quality and "
           "the session term reach the data. " if p.get("clicks") else "Every exposure is an event. ")
        + "Every arm is the real two-tower (configs/synth-churn.yaml, Ray Train, 2 workers, MPZCH "
        f"tables `{' '.join(p['overrides'])}`, TTL 24 h), {p['epochs_per_day']} epoch(s) per job call:",
        "",
        "- **frozen**: trained on day 0, never again;",
        "- **continual**: trained on day 0, then every day `rayrec train --continue` "
        "(training/jobs/continue_retrieval.py) on that day's events written to the arm's feedback log as one "
        "part of clicks: only the events past the watermark train, histories from everything trained so far, "
        "MPZCH admits the new ids with the clock on day d and TTL eviction on, and the next version is exported;",
        "- **daily full retrain**: each day a fresh run on every event of days 0..d;",
        "- **continual, no eviction**: continual with `model.tables.eviction=none`.",
        "",
        f"Scoring (benchmarks/day_scorer.py), one protocol for every arm, from each arm's committed checkpoint "
        f"loaded in one process: up to {p['max_users']:,} users active on day d+1, their history the last items of "
        "days 0..d (as served with live histories), full ranking of the catalogue born by the end of day d+1 that "
        "holds a row of its own in the model's MPZCH item table (what its export indexes: an id-only two-tower has "
        "no vector for the rest, so it serves no item without an event), items seen on days 0..d masked. *True*: against the generator's true preference "
        "(`training.data.synth_world.PreferenceOracle`, σ(z̄) with the session term from the user's newest item): "
        "Recall@10 = share of the user's true top 10 served, NDCG@10 with σ(z̄) as the gain. *Event*: the user's "
        "first event on day d+1 on an item not seen before (the held-out next-day event). Cold item: no event on "
        "days 0..d.",
        "",
    ]
    for metric in ("event_recall@10", "event_ndcg@10", "true_recall@10", "true_ndcg@10", "cold_item_share@10"):
        lines += [f"**{METRIC_LABEL[metric]}** (scored on day d+1)", "",
                  "| day d | " + " | ".join(LABEL[a] for a in ARMS) + " | continual - frozen | continual - daily retrain |",
                  "|---|" + "---|" * (len(ARMS) + 2)]
        for d in days:
            lines.append(f"| {d} | " + " | ".join(cell(rows, metric, d, arm=a) for a in ARMS)
                         + f" | {cell(rows, metric + '_minus', d, minus='frozen')}"
                         + f" | {cell(rows, metric + '_minus', d, minus='daily_retrain')} |")
        lines.append("| mean over days 1.. | " + " | ".join("" for _ in ARMS)
                     + f" | {cell(rows, metric + '_minus', 'after_0', minus='frozen')}"
                     + f" | {cell(rows, metric + '_minus', 'after_0', minus='daily_retrain')} |")
        refs = "; ".join(f"{name} " + " / ".join(cell(rows, metric, d, arm=name) for d in days)
                         for name in ("popularity", "random") if pick(rows, metric, days[0], arm=name))
        if refs:
            lines += ["", f"Without a model, same users and protocol (days {days[0]}..{days[-1]}): {refs}."]
        if metric == "cold_item_share@10":
            truth = " / ".join(f"day {d}: {pick(rows, 'truth_cold_share@10', d, arm='continual')['value']:.3f}" for d in days)
            lines += ["", f"Cold-item share of the users' true top 10, for scale: {truth}."]
        lines.append("")
    lines += compute_lines(rows) + ttl_lines(rows, days) + claims(rows)
    if details and details.get("records_written"):
        lines += ["The arms' per-seed records were written " + ", ".join(
            f"seed {s}: {when}" for s, when in details["records_written"].items()) + " (the command above reads them "
            "back from its work folder when they are there; the popularity and random lists are recomputed).", ""]
    return lines


def compute_lines(rows: list[dict]) -> list[str]:
    """Compute per arm over all days, and continual's share of the daily retrain's."""
    lines = ["**Compute over all training days** (sum per seed, mean ± SE)", "",
             "| arm | training-loop s (rank 0) | examples processed (all workers) | job wall s (Ray Train start, data, "
             "eval, checkpoints) |", "|---|---|---|---|"]
    for a in ARMS:
        lines.append(f"| {LABEL[a]} | {cell(rows, 'train_s', 'all', 1, arm=a)} | {cell(rows, 'examples', 'all', 0, arm=a)} "
                     f"| {cell(rows, 'wall_s', 'all', 0, arm=a)} |")
    ratio = {k: pick(rows, k, "all", arm="continual")["value"] / pick(rows, k, "all", arm="daily_retrain")["value"]
             for k in ("train_s", "examples", "wall_s")}
    lines += ["", f"Continual / daily retrain: {ratio['examples']:.2f}x the examples, {ratio['train_s']:.2f}x the "
              f"training-loop seconds, {ratio['wall_s']:.2f}x the job wall seconds (at this size the wall time is "
              "mostly the fixed cost of starting a Ray Train job, which both pay once a day; the examples grow with "
              "the days for the retrain only).", ""]
    return lines


def ttl_lines(rows: list[dict], days: list[int]) -> list[str]:
    """Continual with TTL eviction vs without: stale rows and quality per day."""
    lines = ["**TTL eviction vs none, continual arm**: stale-row share = rows held by ids whose TTL has passed at "
             "day d's clock / rows (benchmarks/mpzch_churn_training.py's measure)", "",
             "| day d | stale rows, user (ttl / none) | stale rows, item (ttl / none) | Recall@10 event (ttl / none) "
             "| NDCG@10 true (ttl / none) | ttl - none, Recall@10 event |", "|---|---|---|---|---|---|"]
    for d in days:
        stale = [f"{cell(rows, 'stale_row_share', d, 3, arm='continual', table=t)} / "
                 f"{cell(rows, 'stale_row_share', d, 3, arm='continual_no_eviction', table=t)}" for t in ("user", "item")]
        lines.append(f"| {d} | {stale[0]} | {stale[1]} | {cell(rows, 'event_recall@10', d, arm='continual')} / "
                     f"{cell(rows, 'event_recall@10', d, arm='continual_no_eviction')} | "
                     f"{cell(rows, 'true_ndcg@10', d, arm='continual')} / {cell(rows, 'true_ndcg@10', d, arm='continual_no_eviction')} "
                     f"| {cell(rows, 'event_recall@10_minus', d, minus='continual_no_eviction')} |")
    lines += ["", "Over days 1.., continual with TTL minus without: Recall@10 (event) "
              f"{verdict(rows, 'event_recall@10', 'continual_no_eviction')}; NDCG@10 (true) "
              f"{verdict(rows, 'true_ndcg@10', 'continual_no_eviction')}.", ""]
    return lines


def claims(rows: list[dict]) -> list[str]:
    """Issue #29's two quality claims, metric by metric, over all scored days."""
    lines = ["**What held** (paired by seed, mean over days 1..; on day 0 every arm is the same model, trained "
             "the same way on the same events):", ""]
    for metric in ("event_recall@10", "event_ndcg@10", "true_recall@10", "true_ndcg@10"):
        lines.append(f"- {METRIC_LABEL[metric]}: continual - frozen {verdict(rows, metric, 'frozen')}; "
                     f"continual - daily retrain {verdict(rows, metric, 'daily_retrain')}"
                     + "".join(f"; continual - {name} {verdict(rows, metric, name)}" for name in ("popularity", "random")
                               if pick(rows, f"{metric}_minus", "after_0", minus=name)) + ".")
    cold = {other: pick(rows, "cold_item_share@10_minus", "after_0", minus=other) for other in ("frozen", "daily_retrain")}
    if all(cold.values()):
        lines.append(f"- Cold items served (share of the top 10 with no event before the scored day): continual "
                     f"{cold['frozen']['value']:+.3f} vs frozen and {cold['daily_retrain']['value']:+.3f} vs the daily "
                     "retrain (see the table above for the true top 10's own share).")
    return lines + [""]
