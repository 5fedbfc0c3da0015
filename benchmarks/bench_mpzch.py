"""MPZCH benchmark: collisions, throughput and staleness of rayrec's CPU insert kernel.

Run: ``.venv/bin/python benchmarks/bench_mpzch.py`` (``make bench-mpzch``); about 3 minutes on
2 cores. Writes ``docs/benchmarks/mpzch.md``, ``mpzch.json`` (format:
``/work/shared/specs/benchmark-results.md``) and ``mpzch_*.png`` (Markdown and plots:
``benchmarks/mpzch_report.py``; ``--render`` rebuilds the Markdown from the JSON alone).

What it measures, all on a 1,000,000-row table, batches of 4,096 IDs, one thread:

1. ``colliding_id_share``: after streaming ``load × rows`` distinct IDs through each system,
   the share of distinct IDs that share their row with another ID. Systems: ``modulo``
   (``murmur3(id) % rows``), ``mpzch`` (rayrec's insert kernel, max_probe 16 and 128),
   ``sorted_mch`` (TorchRec's ``MCHManagedCollisionModule``, DistanceLFU, one admission pass
   at the end of the stream). Datasets: ``random63`` (uniform 63-bit IDs, each once) and
   ``zipf-churn`` (a Zipf-popular stream whose vocabulary is born and dies over 8 "hours").
2. ``ids_per_s``: insert (rayrec) vs fbgemm's readonly lookup vs sorted MCH remap / train vs
   the vectorised murmur3 alone, on a table at load 0.8 with batches of 80% present IDs.
3. ``stale_row_share``: as a churning stream runs for 12 hours, the share of rows held by IDs
   whose TTL has passed, with single-TTL eviction (policy 0) and without eviction.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fbgemm_gpu  # noqa: E402,F401  (registers torch.ops.fbgemm)
from torchrec.modules.mc_modules import DistanceLFU_EvictionPolicy, MCHManagedCollisionModule  # noqa: E402
from torchrec.sparse.jagged_tensor import JaggedTensor  # noqa: E402

from embeddings.hashing import murmur_hash3, unsigned_mod  # noqa: E402
from embeddings.kernel import zero_collision_hash_insert  # noqa: E402
from results import git_commit, machine  # noqa: E402
from results import versions as _versions  # noqa: E402
from mpzch_report import IMAGES, OUT_DIR, markdown, plot  # noqa: E402  (benchmarks/mpzch_report.py: Markdown and plots)



@dataclass(frozen=True)
class BenchConfig:
    """Sizes of every experiment.

    Args:
        rows: table rows (one bucket, as an unsharded table).
        batch: IDs per kernel call.
        loads: distinct IDs streamed, as a multiple of ``rows``.
        max_probes: MPZCH probe windows compared.
        churn_hours: hours in the Zipf churn stream of the collision experiment.
        churn_lifetime: hours each ID of that stream stays alive.
        zipf_alpha: popularity exponent of the Zipf streams.
        timed_batches: batches timed per throughput figure (the median is reported).
        stale_hours: hours of the TTL experiment; stale_ttl: the TTL and an ID's lifetime.
        seed: every generator's seed.
    """

    rows: int = 1_000_000
    batch: int = 4096
    loads: tuple[float, ...] = (0.5, 0.8, 0.95, 1.2)
    max_probes: tuple[int, ...] = (16, 128)
    churn_hours: int = 8
    churn_lifetime: int = 3
    zipf_alpha: float = 1.05
    timed_batches: int = 60
    stale_hours: int = 12
    stale_ttl: int = 2
    seed: int = 0


Row = dict


def _row(system: str, dataset: str, metric: str, value: float | None, **params) -> Row:
    row = {"system": system, "dataset": dataset, "metric": metric,
           "value": None if value is None else round(float(value), 6), "params": params}
    return row


# --------------------------------------------------------------------------------------------
# streams


def distinct_ids(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct non-negative 63-bit IDs in random order ``[count]``."""
    ids = torch.unique(torch.randint(0, 2**63 - 1, (int(count * 1.01) + 16,), generator=generator))
    return ids[torch.randperm(ids.numel(), generator=generator)][:count]


def zipf_draw(population: int, draws: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Ranks in [0, population) drawn with P(rank r) ∝ (r + 1)^-alpha ``[draws]``."""
    weights = torch.arange(1, population + 1, dtype=torch.float64).pow(-alpha)
    cdf = torch.cumsum(weights, 0)
    u = torch.rand(draws, generator=generator, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u).clamp_max(population - 1)


def churn_stream(
    vocabulary: torch.Tensor, hours: int, lifetime: int, alpha: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """A stream split by hour: each ID is born in a random hour and lives ``lifetime`` hours.

    Hour h sends every ID born in h once (so all of ``vocabulary`` appears) plus as many Zipf
    draws over the IDs alive in h (popularity rank = a random but fixed order). Returns one
    ``[events_h]`` tensor per hour, shuffled.
    """
    birth = torch.randint(0, hours, (vocabulary.numel(),), generator=generator)
    rank_order = torch.randperm(vocabulary.numel(), generator=generator)
    by_rank = vocabulary[rank_order]  # by_rank[0] is the most popular ID overall
    birth_by_rank = birth[rank_order]
    stream = []
    for hour in range(hours):
        alive = by_rank[(birth_by_rank <= hour) & (birth_by_rank > hour - lifetime)]
        newborn = vocabulary[birth == hour]
        popular = alive[zipf_draw(alive.numel(), alive.numel(), alpha, generator)]
        events = torch.cat([newborn, popular])
        stream.append(events[torch.randperm(events.numel(), generator=generator)])
    return stream


def batches_of(ids: torch.Tensor, batch: int) -> list[torch.Tensor]:
    return list(torch.split(ids, batch))


# --------------------------------------------------------------------------------------------
# collision measurement


def sharing_share(rows_of_ids: torch.Tensor, num_rows: int) -> float:
    """Share of distinct IDs whose row holds another distinct ID too. ``rows_of_ids`` [U]."""
    per_row = torch.bincount(rows_of_ids, minlength=num_rows)
    return float((per_row[rows_of_ids] > 1).double().mean())


def mpzch_collisions(stream: list[torch.Tensor], unique: torch.Tensor, rows: int, max_probe: int) -> dict:
    identities = torch.full((rows, 1), -1, dtype=torch.int64)
    for batch in stream:
        zero_collision_hash_insert(batch, identities, max_probe, circular_probe=True)
    # Where each ID lives is what fbgemm's own readonly kernel (serving, eval) returns for it.
    slots, _ = torch.ops.fbgemm.zero_collision_hash(unique, identities, max_probe, circular_probe=True, readonly=True)
    no_own = identities[slots, 0] != unique
    return {"colliding_id_share": sharing_share(slots, rows), "no_own_slot_share": float(no_own.double().mean())}


def sorted_mch_collisions(stream: list[torch.Tensor], unique: torch.Tensor, rows: int) -> dict:
    """TorchRec's sorted MCH with one admission pass over the whole stream (its best case:
    every ID it can hold is admitted; DistanceLFU keeps the most frequent when over capacity)."""
    module = MCHManagedCollisionModule(
        zch_size=rows, device=torch.device("cpu"), eviction_policy=DistanceLFU_EvictionPolicy(),
        eviction_interval=len(stream),
    )
    # Its history buffer is sized from the first batch × interval × 1.25; the last batch may be
    # short, so the first one must be the largest (all but the last are full).
    module.train()
    for batch in stream:
        module({"f": JaggedTensor(values=batch, lengths=torch.ones_like(batch))})
    module.eval()
    slots = module({"f": JaggedTensor(values=unique, lengths=torch.ones_like(unique))})["f"].values()
    held = torch.isin(unique, module._mch_sorted_raw_ids)
    return {"colliding_id_share": sharing_share(slots, rows), "no_own_slot_share": float((~held).double().mean())}


def collision_rows(cfg: BenchConfig) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    curves: dict = {}
    for dataset in ("random63", "zipf-churn"):
        for load in cfg.loads:
            generator = torch.Generator().manual_seed(cfg.seed + int(load * 1000))
            unique = distinct_ids(int(cfg.rows * load), generator)
            if dataset == "random63":
                events = [unique]
                params = {"load": load, "rows": cfg.rows}
            else:
                events = churn_stream(unique, cfg.churn_hours, cfg.churn_lifetime, cfg.zipf_alpha, generator)
                params = {"load": load, "rows": cfg.rows, "hours": cfg.churn_hours, "lifetime_hours": cfg.churn_lifetime,
                          "zipf_alpha": cfg.zipf_alpha, "events": int(sum(e.numel() for e in events))}
            stream = batches_of(torch.cat(events), cfg.batch)

            modulo = sharing_share(unsigned_mod(murmur_hash3(unique), cfg.rows), cfg.rows)
            rows.append(_row("modulo", dataset, "colliding_id_share", modulo, **params))
            curves.setdefault((dataset, "modulo"), []).append((load, modulo))
            for max_probe in cfg.max_probes:
                result = mpzch_collisions(stream, unique, cfg.rows, max_probe)
                for metric, value in result.items():
                    rows.append(_row("mpzch", dataset, metric, value, max_probe=max_probe, **params))
                curves.setdefault((dataset, f"mpzch mp{max_probe}"), []).append((load, result["colliding_id_share"]))
            result = sorted_mch_collisions(stream, unique, cfg.rows)
            for metric, value in result.items():
                rows.append(_row("sorted_mch", dataset, metric, value, eviction="DistanceLFU, one pass", **params))
            curves.setdefault((dataset, "sorted_mch"), []).append((load, result["colliding_id_share"]))
            print(f"  collisions {dataset} load {load}: done", flush=True)
    return rows, curves


# --------------------------------------------------------------------------------------------
# throughput


def median_ids_per_s(batches: list[torch.Tensor], call: Callable[[torch.Tensor], object]) -> float:
    """IDs/s of the median batch (each batch timed alone; two warm-up calls first)."""
    for batch in batches[:2]:
        call(batch)
    times = []
    for batch in batches:
        start = time.perf_counter()
        call(batch)
        times.append(time.perf_counter() - start)
    return batches[0].numel() / statistics.median(times)


def throughput_rows(cfg: BenchConfig) -> list[Row]:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(cfg.seed + 7)
    load = 0.8
    present_count = int(cfg.rows * load)
    new_per_batch = cfg.batch // 5
    ids = distinct_ids(present_count + new_per_batch * (cfg.timed_batches + 2), generator)
    present, fresh = ids[:present_count], ids[present_count:]
    query = []
    for b in range(cfg.timed_batches + 2):
        old = present[torch.randint(0, present_count, (cfg.batch - new_per_batch,), generator=generator)]
        mixed = torch.cat([old, fresh[b * new_per_batch:(b + 1) * new_per_batch]])
        query.append(mixed[torch.randperm(mixed.numel(), generator=generator)])
    common = {"threads": 1, "batch": cfg.batch, "rows": cfg.rows, "load": load, "present_share": 0.8}
    dataset = "random63"
    out: list[Row] = []

    def filled_table(max_probe: int) -> torch.Tensor:
        identities = torch.full((cfg.rows, 1), -1, dtype=torch.int64)
        for batch in batches_of(present, 65536):
            zero_collision_hash_insert(batch, identities, max_probe, circular_probe=True)
        return identities

    for max_probe in cfg.max_probes:
        table = filled_table(max_probe)
        lookup = median_ids_per_s(query, lambda x: torch.ops.fbgemm.zero_collision_hash(
            x, table, max_probe, circular_probe=True, readonly=True))
        out.append(_row("fbgemm_readonly", dataset, "ids_per_s", lookup, mode="lookup", max_probe=max_probe, **common))
        ours_lookup = median_ids_per_s(query, lambda x: zero_collision_hash_insert(
            x, table, max_probe, circular_probe=True, readonly=True))
        out.append(_row("mpzch", dataset, "ids_per_s", ours_lookup, mode="lookup", max_probe=max_probe, **common))
        # Inserting mutates: each timed batch adds ~819 new IDs (load 0.80 → ~0.85 by the end).
        work = table.clone()
        insert = median_ids_per_s(query, lambda x: zero_collision_hash_insert(x, work, max_probe, circular_probe=True))
        out.append(_row("mpzch", dataset, "ids_per_s", insert, mode="insert", max_probe=max_probe,
                        eviction="none", **common))
        work = table.clone()
        metadata = torch.full((cfg.rows, 1), 100, dtype=torch.int32)
        expiry = torch.full((cfg.batch,), 200, dtype=torch.int32)
        insert_ttl = median_ids_per_s(query, lambda x: zero_collision_hash_insert(
            x, work, max_probe, circular_probe=True, metadata=metadata, input_metadata=expiry[: x.numel()],
            eviction_threshold=150))  # every resident row is expired: new IDs evict at once
        out.append(_row("mpzch", dataset, "ids_per_s", insert_ttl, mode="insert", max_probe=max_probe,
                        eviction="ttl (all rows expired)", **common))
        print(f"  throughput mp{max_probe}: lookup {lookup / 1e6:.1f}M, insert {insert / 1e6:.1f}M", flush=True)

    hash_only = median_ids_per_s(query, murmur_hash3)
    out.append(_row("murmur3_torch", dataset, "ids_per_s", hash_only, mode="hash", **common))

    fill = batches_of(present, cfg.batch)
    mch = MCHManagedCollisionModule(zch_size=cfg.rows, device=torch.device("cpu"),
                                    eviction_policy=DistanceLFU_EvictionPolicy(), eviction_interval=len(fill))
    mch.train()
    for batch in fill:  # one admission pass at the end fills the table with the present IDs
        mch({"f": JaggedTensor(values=batch, lengths=torch.ones_like(batch))})
    mch.eval()
    remap = median_ids_per_s(query, lambda x: mch({"f": JaggedTensor(values=x, lengths=torch.ones_like(x))}))
    out.append(_row("sorted_mch", dataset, "ids_per_s", remap, mode="lookup", **common))
    mch.train()
    for interval, calls in ((1, 12), (100, 300)):
        # Training with periodic eviction: the cost lands on one call in `interval`, so this row is
        # amortized (all IDs / all time over `calls` calls, two evictions or more), not a median.
        mch._eviction_interval = interval
        mch._input_history_buffer_size = -1  # resize the history buffer for the new interval
        batches = [query[i % len(query)] for i in range(calls)]
        started = time.perf_counter()
        for x in batches:
            mch({"f": JaggedTensor(values=x, lengths=torch.ones_like(x))})
        train = calls * cfg.batch / (time.perf_counter() - started)
        out.append(_row("sorted_mch", dataset, "ids_per_s", train, mode="insert", timing="amortized",
                        eviction=f"DistanceLFU every {interval} calls", **common))
    print(f"  throughput: hash {hash_only / 1e6:.1f}M, sorted MCH remap {remap / 1e6:.1f}M", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# staleness under churn


def stale_rows(cfg: BenchConfig) -> tuple[list[Row], dict]:
    """A 12-hour churning stream into a table sized for ~0.6 × rows live IDs at a time.

    Both tables get the same expiry bookkeeping (expiry = hour + TTL, the single-TTL scorer's
    convention): the TTL table through the kernel (metadata, eviction_threshold = hour), the
    plain one by writing expiry of rows whose ID was inserted. A row is stale when its expiry
    has passed.
    """
    generator = torch.Generator().manual_seed(cfg.seed + 11)
    live_share = 0.6
    vocabulary = distinct_ids(int(cfg.rows * live_share * cfg.stale_hours / cfg.stale_ttl), generator)
    stream = churn_stream(vocabulary, cfg.stale_hours, cfg.stale_ttl, cfg.zipf_alpha, generator)
    params = {"rows": cfg.rows, "ttl_hours": cfg.stale_ttl, "lifetime_hours": cfg.stale_ttl,
              "live_share": live_share, "max_probe": 128, "zipf_alpha": cfg.zipf_alpha}
    out: list[Row] = []
    curves: dict = {}
    tables = {
        "ttl": (torch.full((cfg.rows, 1), -1, dtype=torch.int64), torch.full((cfg.rows, 1), -1, dtype=torch.int32)),
        "none": (torch.full((cfg.rows, 1), -1, dtype=torch.int64), torch.full((cfg.rows, 1), -1, dtype=torch.int32)),
    }
    hour0 = 1000  # hours are simulated: the kernel takes the hour it is given
    for h, events in enumerate(stream):
        hour = hour0 + h
        hour_unique = torch.unique(events)
        for eviction, (identities, expiry) in tables.items():
            for batch in batches_of(events, cfg.batch):
                stamp = torch.full((batch.numel(),), hour + cfg.stale_ttl, dtype=torch.int32)
                if eviction == "ttl":
                    zero_collision_hash_insert(batch, identities, 128, circular_probe=True, metadata=expiry,
                                               input_metadata=stamp, eviction_threshold=hour)
                else:
                    slots, _ = zero_collision_hash_insert(batch, identities, 128, circular_probe=True)
                    owned = identities[slots, 0] == batch
                    expiry[slots[owned], 0] = hour + cfg.stale_ttl
            slots, _ = zero_collision_hash_insert(hour_unique, identities, 128, circular_probe=True, readonly=True)
            no_own = float((identities[slots, 0] != hour_unique).double().mean())
            occupied = identities[:, 0] != -1
            # Expired exactly as the kernel decides it: eviction_threshold (this hour) > expiry.
            stale = float((occupied & (expiry[:, 0] < hour)).double().mean())
            occupancy = float(occupied.double().mean())
            for metric, value in (("stale_row_share", stale), ("no_own_slot_share", no_own), ("occupied_share", occupancy)):
                out.append(_row("mpzch", "zipf-churn", metric, value, eviction=eviction, hour=h, **params))
            curves.setdefault(eviction, []).append((h, stale, no_own))
    print("  staleness: done", flush=True)
    return out, curves


# --------------------------------------------------------------------------------------------
# report


def versions() -> dict:
    out = _versions({"torch": "torch", "torchrec": "torchrec", "fbgemm_gpu": "fbgemm-gpu-cpu", "ray": "ray"})
    out["torch"] = torch.__version__
    return out


def quality_rows(epochs: int = 3) -> list[Row]:
    """Recall@10 of the same two-tower on ml-100k with fewer rows than ids: MPZCH vs modulo.

    Both runs get the same row budget (user 512 rows for 943 users, item 1,024 rows for 1,682
    items). "modulo" is the same table with ``max_probe=1``: an id takes its hash slot if free
    and otherwise shares it, which is plain hashing (murmur3 % rows) with sharing counted.
    """
    import tempfile

    import ray

    from training.config import load_config
    from training.data.movielens import prepare_ml100k
    from training.jobs.train_retrieval import run

    data = ROOT / "data" / "ml-100k"
    prepare_ml100k(data)
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-mpzch-") as runs:
        for system, max_probe in (("mpzch", 128), ("modulo", 1)):
            cfg = load_config(ROOT / "configs" / "ml100k.yaml", [
                f"data.path={data}", f"runs_dir={runs}", f"train.epochs={epochs}",
                "model.user_cardinality=512", "model.item_cardinality=1024",
                "model.tables.load_factor=1.0", f"model.tables.max_probe={max_probe}",
            ])
            result = run(cfg, run_id=system)
            test = json.loads(result.eval_path.read_text())
            last = list(result.read_metrics())[-1]
            params = {"max_probe": max_probe, "user_rows": 512, "item_rows": 1024, "epochs": epochs,
                      "item_fallbacks_last_epoch": last.get("mpzch/item/fallbacks")}
            rows.append(_row(system, "ml-100k", "recall@10", test["test/recall@10"], **params))
            rows.append(_row(system, "ml-100k", "ndcg@10", test["test/ndcg@10"], **params))
    ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a 100k-row smoke run of the same code (its files are overwritten by a full run)")
    parser.add_argument("--render", action="store_true", help="rebuild mpzch.md from mpzch.json; measure nothing")
    args = parser.parse_args()
    if args.render:
        report = json.loads((OUT_DIR / "mpzch.json").read_text())
        (OUT_DIR / "mpzch.md").write_text(markdown(report, IMAGES, report["seconds"]))
        return
    quick = args.quick
    cfg = BenchConfig(rows=100_000, timed_batches=10) if quick else BenchConfig()
    started = time.perf_counter()
    torch.set_num_threads(1)
    load_average = os.getloadavg()[0]
    print("collisions ...", flush=True)
    collision, collision_curves = collision_rows(cfg)
    print("throughput ...", flush=True)
    throughput = throughput_rows(cfg)
    print("staleness ...", flush=True)
    stale, stale_curves = stale_rows(cfg)
    print("model quality (two 2-worker training runs on ml-100k) ...", flush=True)
    quality = quality_rows(epochs=1 if quick else 3)
    report = {
        "benchmark": "mpzch",
        "command": "make bench-mpzch",
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {**machine(), "load_average_at_start": round(load_average, 2)},
        "versions": versions(),
        "config": asdict(cfg),
        "rows": collision + throughput + stale + quality,
    }
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    images = plot(collision_curves, stale_curves)
    seconds = time.perf_counter() - started
    report["seconds"] = round(seconds, 1)
    (OUT_DIR / "mpzch.json").write_text(json.dumps(report, indent=1) + "\n")
    (OUT_DIR / "mpzch.md").write_text(markdown(report, images, seconds))
    print(f"wrote {OUT_DIR / 'mpzch.md'} and mpzch.json in {seconds:.0f} s")


if __name__ == "__main__":
    main()
