"""A synthetic short-video dataset in rayrec's layout, streamed with bounded memory.

Why synthetic: ml-100k is small, dense and static. The MPZCH tables, the streaming loader and
the ranker need data with raw 64-bit IDs, heavy-tailed popularity, a catalogue that keeps
changing, and engagement signals whose biases are *known*, so a debiasing ranker can be checked
against the truth. Scale is a parameter: the defaults make a 200k-row dataset in seconds, and
``--users 10_000_000 --items 1_000_000 --interactions 100_000_000`` stays within a few GiB
because rows are generated and written one chunk (``row_group_size`` rows) at a time.

The generative model (IDs, time, items, users, exposure, true preference, the planted
engagement biases and topics) is :mod:`training.data.synth_world`; this module writes it out.

Extra columns beyond the layout's: interactions add ``item_length`` (float32 s),
``watch_time`` (float32 s), ``loop`` and ``comment`` (int8 0/1), ``user_activity`` (float32,
a_u) and ``true_pref`` (float32); items add ``category`` (int32), ``item_length`` and
``birth_ts`` (int64 s); users add ``activity``.

Split: leave-one-out by time per user, as for ml-100k, in two passes over the generator. The
generator is deterministic per chunk, so the second pass regenerates the same rows instead of
storing them: pass 1 records each user's last two stream positions
(:class:`~training.data.split.LastTwoTracker`, 16 bytes per user), pass 2 regenerates, adds
engagement and routes rows to train/valid/test. Chunks cover disjoint time ranges and are
sorted by (timestamp, item_id) inside, so stream order is the split's order. Memory is
O(U + I + row_group_size), independent of N.

Example::

    info = generate_synth(Path("data/synth"), users=10_000, items=5_000,
                          interactions=200_000, seed=0)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from training.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    SPLITS,
    USERS_SCHEMA,
    DatasetError,
    DatasetPaths,
    load_dataset_info,
    validate_dataset,
    write_dataset_info,
)
from training.data.split import SPLIT_RULE, LastTwoTracker
from training.data.synth_world import (
    CATEGORY_NAMES,
    OCCUPATIONS,
    SynthConfig,
    World,
    build_world,
    engagement_columns,
    exposures,
    previous_category,
)

log = logging.getLogger(__name__)

SYNTH_INTERACTIONS_SCHEMA = pa.schema(
    list(INTERACTIONS_SCHEMA)
    + [
        pa.field("item_length", pa.float32(), nullable=False),
        pa.field("watch_time", pa.float32(), nullable=False),
        pa.field("loop", pa.int8(), nullable=False),
        pa.field("comment", pa.int8(), nullable=False),
        pa.field("user_activity", pa.float32(), nullable=False),
        pa.field("true_pref", pa.float32(), nullable=False),
    ]
)
SYNTH_ITEMS_SCHEMA = pa.schema(
    list(ITEMS_SCHEMA)
    + [
        pa.field("category", pa.int32(), nullable=False),
        pa.field("item_length", pa.float32(), nullable=False),
        pa.field("birth_ts", pa.int64(), nullable=False),
    ]
)
SYNTH_USERS_SCHEMA = pa.schema(list(USERS_SCHEMA) + [pa.field("activity", pa.float32())])


class _RowGroupWriter:
    """A ParquetWriter that packs small pieces into full row groups of ``row_group_size`` rows.

    valid/test get a few rows per chunk; writing them as they come would make thousands of tiny
    row groups. The buffer never holds more than ~2 row groups, so memory stays bounded.
    """

    def __init__(self, path: Path, schema: pa.Schema, row_group_size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, schema)
        self._row_group_size = row_group_size
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= self._row_group_size:
            buffered = pa.concat_tables(self._pending)
            full = buffered.num_rows - buffered.num_rows % self._row_group_size
            self._writer.write_table(buffered.slice(0, full), row_group_size=self._row_group_size)
            self._pending = [buffered.slice(full)]
            self._pending_rows = buffered.num_rows - full

    def close(self) -> None:
        if self._pending_rows:
            rest = pa.concat_tables(self._pending)
            self._writer.write_table(rest, row_group_size=self._row_group_size)
        self._writer.close()


def _ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, size):
        yield lo, min(lo + size, total)


def _write_items(cfg: SynthConfig, world: World, path: Path) -> None:
    rng = np.random.default_rng([cfg.seed, 3])
    names = pa.array(CATEGORY_NAMES)
    num_categories = len(CATEGORY_NAMES)
    writer = _RowGroupWriter(path, SYNTH_ITEMS_SCHEMA, cfg.row_group_size)
    for lo, hi in _ranges(cfg.items, cfg.row_group_size):
        n = hi - lo
        category = world.item_category[lo:hi].astype(np.int64)
        # genres: the category's name, plus another category's name for 30% of items; built
        # as a list array from offsets so no Python list is made per item.
        has_second = rng.random(n) < 0.3
        other = (category + rng.integers(1, num_categories, n)) % num_categories
        offsets = np.concatenate([[0], np.cumsum(1 + has_second)]).astype(np.int32)  # [n+1]
        genre_code = np.empty(offsets[-1], dtype=np.int64)
        genre_code[offsets[:-1]] = category
        genre_code[offsets[:-1][has_second] + 1] = other[has_second]
        genres = pa.ListArray.from_arrays(pa.array(offsets), names.take(pa.array(genre_code)))
        number = pc.utf8_lpad(pc.cast(pa.array(np.arange(lo, hi)), pa.string()), 7, "0")
        birth = world.item_birth[lo:hi]
        year = birth.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int32) + 1970
        if world.topics is None:
            title = pc.binary_join_element_wise("synth item ", number, "")
        else:  # the topic is content a model can read; the item number is not (an id in disguise)
            topic_word = pc.cast(pa.array(world.topics.item_topic[lo:hi]), pa.string())
            title = pc.binary_join_element_wise("synth item t", topic_word, "")
        columns = {
            "item_id": pa.array(world.item_ids[lo:hi]),
            "title": title,
            "year": pa.array(year),
            "genres": genres,
            "category": pa.array(category.astype(np.int32)),
            "item_length": pa.array(world.item_length[lo:hi]),
            "birth_ts": pa.array(birth),
        }
        writer.write(pa.Table.from_pydict(columns, schema=SYNTH_ITEMS_SCHEMA))
    writer.close()


def _write_users(cfg: SynthConfig, world: World, path: Path) -> None:
    rng = np.random.default_rng([cfg.seed, 4])
    genders, occupations = pa.array(["F", "M"]), pa.array(OCCUPATIONS)
    writer = _RowGroupWriter(path, SYNTH_USERS_SCHEMA, cfg.row_group_size)
    for lo, hi in _ranges(cfg.users, cfg.row_group_size):
        n = hi - lo
        zip_number = pc.cast(pa.array(rng.integers(0, 100_000, n)), pa.string())
        columns = {
            "user_id": pa.array(world.user_ids[lo:hi]),
            "age": pa.array(rng.integers(13, 71, n).astype(np.int32)),
            "gender": genders.take(pa.array(rng.integers(0, 2, n))),
            "occupation": occupations.take(pa.array(rng.integers(0, len(OCCUPATIONS), n))),
            "zip": pc.utf8_lpad(zip_number, 5, "0"),
            "activity": pa.array(world.user_activity[lo:hi]),
        }
        writer.write(pa.Table.from_pydict(columns, schema=SYNTH_USERS_SCHEMA))
    writer.close()


def _write_interactions(
    cfg: SynthConfig, world: World, paths: DatasetPaths, progress: bool
) -> dict[str, int]:
    """The two passes described in the module docstring. Returns rows per split."""
    tracker = LastTwoTracker(cfg.users)
    chunks = range(cfg.num_chunks)
    for k in tqdm(chunks, desc="synth 1/2 find last two per user", disable=not progress):
        chunk = exposures(cfg, world, k)
        tracker.update(chunk.users, chunk.start)

    schema, size = SYNTH_INTERACTIONS_SCHEMA, cfg.row_group_size
    writers = {split: _RowGroupWriter(paths.interactions(split), schema, size) for split in SPLITS}
    last_category = np.full(cfg.users, -1, dtype=np.int8)
    for k in tqdm(chunks, desc="synth 2/2 write splits", disable=not progress):
        chunk = exposures(cfg, world, k)
        columns = engagement_columns(cfg, world, chunk, k, previous_category(world, chunk, last_category))
        table = pa.Table.from_pydict(columns, schema=schema)
        label = tracker.route(chunk.users, chunk.start)  # [n] 0 train, 1 valid, 2 test
        for code, split in enumerate(SPLITS):
            writers[split].write(table.filter(pa.array(label == code)))
    for writer in writers.values():
        writer.close()
    return {split: writer.rows for split, writer in writers.items()}


def _existing_info(out_dir: Path, cfg: SynthConfig) -> dict[str, Any] | None:
    """The info of a complete dataset in ``out_dir`` built with the same config, else None."""
    try:
        stored = load_dataset_info(out_dir).get("generator")
        # settings added later take their defaults, which reproduce the older files
        if stored is None or SynthConfig(**stored) != cfg:
            return None
        return validate_dataset(out_dir)
    except (DatasetError, TypeError, ValueError):  # incomplete, or settings this code does not know
        return None


def generate_synth(
    out_dir: Path,
    users: int = 10_000,
    items: int = 5_000,
    interactions: int = 200_000,
    seed: int = 0,
    *,
    row_group_size: int = 1_000_000,
    days: int = 90,
    topics: int = 0,
    force: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate a synthetic dataset into ``out_dir`` and return its ``dataset.json``.

    A folder already holding a complete dataset made with the same settings is left as it is
    (no-op) unless ``force``. The remaining shape knobs live on :class:`SynthConfig`.

    Args:
        out_dir: the dataset folder, conventionally ``data/synth``.
        users: number of users U.
        items: number of items I.
        interactions: number of interactions N.
        seed: everything derives from it; the same seed and sizes give identical files.
        row_group_size: rows per generated chunk and per Parquet row group; bounds memory.
        days: length of the interaction span.
        topics: fine-grained topics nested in the categories (0: none); see the module docstring.
        force: regenerate even if an identical dataset is present.
        progress: show tqdm bars for the two passes.
    """
    cfg = SynthConfig(
        users=users, items=items, interactions=interactions, seed=seed,
        row_group_size=row_group_size, days=days, topics=topics,
    )  # fmt: skip
    out_dir = Path(out_dir)
    paths = DatasetPaths(out_dir)
    if not force and (existing := _existing_info(out_dir, cfg)) is not None:
        log.info("%s already holds this synth dataset; nothing to do", out_dir)
        return existing

    paths.info.unlink(missing_ok=True)  # written last: its presence marks the folder complete
    if (out_dir / "interactions").exists():
        shutil.rmtree(out_dir / "interactions")
    out_dir.mkdir(parents=True, exist_ok=True)

    log.info("synth: building %d users and %d items", cfg.users, cfg.items)
    world = build_world(cfg)
    _write_items(cfg, world, paths.items)
    _write_users(cfg, world, paths.users)
    log.info("synth: %d interactions in %d chunks", cfg.interactions, cfg.num_chunks)
    counts = _write_interactions(cfg, world, paths, progress)

    extra = {
        "interactions": SYNTH_INTERACTIONS_SCHEMA.names[len(INTERACTIONS_SCHEMA) :],
        "items": SYNTH_ITEMS_SCHEMA.names[len(ITEMS_SCHEMA) :],
        "users": SYNTH_USERS_SCHEMA.names[len(USERS_SCHEMA) :],
    }
    info: dict[str, Any] = {
        "name": out_dir.name,
        "num_users": cfg.users,
        "num_items": cfg.items,
        "num_interactions": cfg.interactions,
        "num_active_users": counts["test"],  # users with at least one interaction
        "split": {
            **SPLIT_RULE,
            "method": "two passes over the deterministic generator: pass 1 records each user's "
            "last two stream positions, pass 2 regenerates the rows and routes them",
        },
        "counts": counts,
        "generator": dataclasses.asdict(cfg),
        "rating": "implicit: 1.0 for every interaction",
        "timestamp_unit": "s",
        "extra_columns": extra,
    }
    write_dataset_info(out_dir, info)
    return info
