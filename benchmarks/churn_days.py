"""A churning synthetic stream cut into simulated days, one dataset folder per day.

Why: the churn benchmark (benchmarks/mpzch_churn_training.py) trains the two-tower one day at a
time, each day continuing from the day before, and scores it on the next day. The job reads one
dataset folder (docs/architecture.md's layout), so each day gets its own:

- ``interactions/train.parquet``: every event of day d;
- ``interactions/valid.parquet`` and ``test.parquet`` (the same rows): each user's first event
  of day d+1 on an item they did not see on day d, the next-day events the model is scored on;
- ``items.parquet``: the catalogue born by the end of day d+1 (the candidates ranked);
- ``users.parquet``: every user.

The stream is :func:`training.data.synth.generate_synth`'s with ``days`` = D+1 and one chunk per
day: 30% of the items exist before day 0 and the rest are born uniformly over the days, users
come by a Zipf activity weight (so most users are seen on few days), and items are drawn by Zipf
popularity among those born. Ids that stop appearing for longer than the TTL are what an
eviction-free table keeps holding.

Example::

    stream = write_days(Path("/tmp/churn"), users=2_000, items=1_000, events_per_day=3_000,
                        days=2, seed=0)
    stream.folders[0]  # /tmp/churn/day-0, trained on day 0, scored on day 1
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.data.schema import INTERACTIONS_SCHEMA, ITEMS_SCHEMA, USERS_SCHEMA, write_dataset_info
from training.data.synth import generate_synth
from training.data.synth_world import START_TS

SECONDS_PER_DAY = 86_400


@dataclass
class ChurnStream:
    """The per-day dataset folders and who appeared when.

    Args:
        folders: ``[D]`` dataset folder of day d (train on d, targets from d+1).
        day_start_hour: ``[D]`` hours since the epoch at the start of day d (the MPZCH clock).
        user_ids / item_ids: ``[D]`` sorted distinct ids trained on day d, per table.
        stream_dir: the whole stream as one synth dataset (its ``dataset.json`` rebuilds the
            generator's world: :class:`training.data.synth_world.PreferenceOracle`).
        clicks: the events are the clicked exposures only (:func:`read_stream`).
    """

    folders: list[Path]
    day_start_hour: list[int]
    user_ids: list[np.ndarray]
    item_ids: list[np.ndarray]
    stream_dir: Optional[Path] = None
    clicks: bool = False


def write_days(root: Path, users: int, items: int, events_per_day: int, days: int, seed: int,
               clicks: bool = False) -> ChurnStream:  # fmt: skip
    """Generate D+1 days of exposures (``events_per_day`` each) and write the D day folders under
    ``root``; with ``clicks`` a folder holds only the clicked ones (:func:`read_stream`)."""
    stream_dir = root / "stream"
    generate_synth(stream_dir, users=users, items=items, interactions=events_per_day * (days + 1), seed=seed,
                   row_group_size=events_per_day, days=days + 1)
    events, day_of = read_stream(stream_dir, clicks)
    item_table = pq.read_table(stream_dir / "items.parquet")
    users_table = pq.read_table(stream_dir / "users.parquet").select(USERS_SCHEMA.names)
    out = ChurnStream([], [], [], [], stream_dir, clicks)
    for day in range(days):
        train = events.filter(pa.array(day_of == day))
        targets = next_day_targets(train, events.filter(pa.array(day_of == day + 1)))
        born = pc.less(item_table.column("birth_ts"), START_TS + (day + 2) * SECONDS_PER_DAY)
        folder = root / f"day-{day}"
        (folder / "interactions").mkdir(parents=True, exist_ok=True)
        pq.write_table(train, folder / "interactions" / "train.parquet")
        for split in ("valid", "test"):
            pq.write_table(targets, folder / "interactions" / f"{split}.parquet")
        catalogue = item_table.filter(born)
        pq.write_table(catalogue.select(ITEMS_SCHEMA.names), folder / "items.parquet")
        pq.write_table(users_table, folder / "users.parquet")
        write_dataset_info(folder, {
            "name": folder.name, "num_users": users_table.num_rows, "num_items": catalogue.num_rows,
            "num_interactions": train.num_rows + targets.num_rows,
            "split": {"kind": "simulated_day", "train": f"every event of day {day}",
                      "valid": f"each user's first event of day {day + 1} on an item unseen on day {day}",
                      "test": "the same rows as valid"},
            "counts": {"train": train.num_rows, "valid": targets.num_rows, "test": targets.num_rows},
            "timestamp_unit": "s",
        })
        out.folders.append(folder)
        out.day_start_hour.append((START_TS + day * SECONDS_PER_DAY) // 3600)
        out.user_ids.append(np.unique(train.column("user_id").to_numpy()))
        out.item_ids.append(np.unique(train.column("item_id").to_numpy()))
    return out


def read_stream(stream_dir: Path, clicks: bool = False) -> tuple[pa.Table, np.ndarray]:
    """Every event of the stream in stream order ``[N]`` and the day each falls on ``[N]``.

    The generator's rows are exposures: who was shown what (by popularity, the favourite
    category and the topic feed), whatever they think of it. With ``clicks`` only the clicked
    exposures are events: each is clicked with probability its ``true_pref`` (σ(z), the
    generator's preference with its per-exposure noise), drawn from the stream's seed so every
    reader keeps the same rows. Why: what ``/feedback`` trains on is clicks, and only a click
    carries the hidden item quality and the session term into the data; on exposures alone a
    model can learn the favourite category and popularity but nothing that separates one
    item of a category from another."""
    columns = [*INTERACTIONS_SCHEMA.names, "true_pref"]
    events = pa.concat_tables([pq.read_table(stream_dir / "interactions" / f"{split}.parquet", columns=columns)
                               for split in ("train", "valid", "test")])
    events = events.sort_by([("timestamp", "ascending"), ("item_id", "ascending")])
    if clicks:
        seed = json.loads((stream_dir / "dataset.json").read_text())["generator"]["seed"]
        draw = np.random.default_rng([seed, 7]).random(events.num_rows)  # [N], in stream order
        events = events.filter(pa.array(draw < events.column("true_pref").to_numpy()))
    events = events.select(INTERACTIONS_SCHEMA.names)
    return events, (events.column("timestamp").to_numpy() - START_TS) // SECONDS_PER_DAY  # [N] 0..D


def union_folder(stream: ChurnStream, day: int) -> Path:
    """Day ``day``'s folder with ``train`` widened to every event of days 0..day: what a daily
    full retrain trains on (targets and catalogue as the day's own folder)."""
    trains = [pq.read_table(stream.folders[d] / "interactions" / "train.parquet") for d in range(day + 1)]
    return _view(stream.folders[day], stream.folders[day].with_name(f"union-{day}"), pa.concat_tables(trains),
                 f"every event of days 0..{day}")


def _view(source: Path, folder: Path, train: pa.Table, train_rule: str) -> Path:
    """``source`` with another ``train``; targets and catalogue as they are."""
    targets = pq.read_table(source / "interactions" / "test.parquet")
    (folder / "interactions").mkdir(parents=True, exist_ok=True)
    pq.write_table(train, folder / "interactions" / "train.parquet")
    for split in ("valid", "test"):
        pq.write_table(targets, folder / "interactions" / f"{split}.parquet")
    for name in ("items.parquet", "users.parquet"):
        (folder / name).write_bytes((source / name).read_bytes())
    info = json.loads((source / "dataset.json").read_text())
    info["name"] = folder.name
    info["split"] = {**info["split"], "train": train_rule}
    info["counts"] = {**info["counts"], "train": train.num_rows}
    write_dataset_info(folder, info)
    return folder


def next_day_targets(today: pa.Table, tomorrow: pa.Table) -> pa.Table:
    """Each user's first event of ``tomorrow`` (in stream order) on an item they did not see in
    ``today``: a seen item is masked by the evaluation, so it could never be retrieved."""
    seen = set(zip(today.column("user_id").to_pylist(), today.column("item_id").to_pylist()))
    users = tomorrow.column("user_id").to_numpy()
    items = tomorrow.column("item_id").to_numpy()
    fresh = np.array([(u, i) not in seen for u, i in zip(users.tolist(), items.tolist())], dtype=bool)  # [N1]
    _, first = np.unique(np.where(fresh, users, -1), return_index=True)  # first row per user (and -1)
    first = first[fresh[first]]
    return tomorrow.take(pa.array(np.sort(first)))
