"""The dataset layout of ``data/<name>/`` and the checks that guard it.

Every dataset rayrec trains on (ml-100k, synth) has the same files, so the loader, the trainer
and the index builder can trust one contract instead of re-checking columns themselves::

    data/<name>/
      interactions/{train,valid,test}.parquet   user_id, item_id, rating, timestamp
      items.parquet                             item_id, title, year, genres
      users.parquet                             user_id, age, gender, occupation, zip
      dataset.json                              counts and the split rule

The schemas below list the *required* columns. A dataset may carry more (synth adds engagement
signals such as ``watch_time``); checks ignore extra columns. IDs are raw 64-bit values, never
re-indexed: the MPZCH tables map them to rows.

Checks fail fast with a :class:`DatasetError` that names the file and, where it applies, the
column, so a broken dataset is caught before any Ray worker starts.

Example::

    paths = DatasetPaths(Path("data/ml-100k"))
    train = read_parquet_checked(paths.interactions("train"), INTERACTIONS_SCHEMA)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SPLITS: tuple[str, ...] = ("train", "valid", "test")

INTERACTIONS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since the Unix epoch
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("year", pa.int32()),  # null when unknown
        pa.field("genres", pa.list_(pa.string())),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("age", pa.int32()),
        pa.field("gender", pa.string()),
        pa.field("occupation", pa.string()),
        pa.field("zip", pa.string()),
    ]
)

DATASET_INFO_KEYS: tuple[str, ...] = (
    "name",
    "num_users",
    "num_items",
    "num_interactions",
    "split",
    "counts",
)


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or does not match the documented layout."""


@dataclass(frozen=True)
class DatasetPaths:
    """Where each file of a dataset lives: the one place that spells the layout's file names.

    Args:
        root: the dataset folder, e.g. ``data/ml-100k``.
    """

    root: Path

    def interactions(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.root / "interactions" / f"{split}.parquet"

    @property
    def items(self) -> Path:
        return self.root / "items.parquet"

    @property
    def users(self) -> Path:
        return self.root / "users.parquet"

    @property
    def info(self) -> Path:
        return self.root / "dataset.json"


def _check_schema(path: Path, schema: pa.Schema, expected: pa.Schema) -> None:
    """Raise naming the first required column that is absent or has another type."""
    for field in expected:
        index = schema.get_field_index(field.name)
        if index < 0:
            raise DatasetError(
                f"{path}: missing column {field.name!r} (expected {field.type}); "
                f"found columns {schema.names}"
            )
        actual = schema.field(index).type
        # DataType equality ignores list child names ("item" vs Parquet's "element").
        if actual != field.type:
            raise DatasetError(
                f"{path}: column {field.name!r} has type {actual}, expected {field.type}"
            )


def validate_table(path: Path | str, table: pa.Table, expected_schema: pa.Schema) -> None:
    """Check that ``table`` (read from or bound for ``path``) fits ``expected_schema``.

    Checks: each required column is present with the exact type, the table is not empty, and
    non-nullable columns (the IDs, rating, timestamp) hold no nulls.
    """
    path = Path(path)
    _check_schema(path, table.schema, expected_schema)
    if table.num_rows == 0:
        raise DatasetError(f"{path}: empty dataset file (0 rows)")
    for field in expected_schema:
        nulls = table.column(field.name).null_count
        if not field.nullable and nulls:
            raise DatasetError(f"{path}: column {field.name!r} has {nulls} nulls, expected none")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: missing file")


def check_parquet_file(path: Path | str, expected_schema: pa.Schema) -> int:
    """Check a Parquet file's footer (schema, row count) without reading its data.

    For files too large to load (100M-row synth interactions) this is the cheap check a loader
    runs before handing the path to Ray Data. Returns the file's row count.
    """
    path = Path(path)
    _require_file(path)
    try:
        metadata = pq.read_metadata(path)
        schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path}: unreadable (corrupt?) Parquet file: {err}") from err
    _check_schema(path, schema, expected_schema)
    if metadata.num_rows == 0:
        raise DatasetError(f"{path}: empty dataset file (0 rows)")
    return metadata.num_rows


def read_parquet_checked(
    path: Path | str, schema: pa.Schema, columns: list[str] | None = None
) -> pa.Table:
    """Read a Parquet file and validate it against ``schema`` (see :func:`validate_table`).

    Args:
        path: the file.
        schema: the required columns and types.
        columns: read only these columns (all by default); the check then covers only the
            required columns among them.
    """
    path = Path(path)
    _require_file(path)
    if columns is not None:
        schema = pa.schema([field for field in schema if field.name in columns])
        check_parquet_file(path, schema)  # names a missing column before the read fails on it
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path}: unreadable (corrupt?) Parquet file: {err}") from err
    validate_table(path, table, schema)
    return table


def write_parquet_checked(table: pa.Table, path: Path, schema: pa.Schema) -> None:
    """Validate ``table`` and write it atomically (temp file + rename).

    The rename means a crash never leaves a half-written file under the final name.
    """
    validate_table(path, table, schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_dataset_info(data_dir: Path, info: dict[str, Any]) -> None:
    """Write ``dataset.json`` atomically. Producers write it last: its presence marks a
    complete dataset folder."""
    missing = [key for key in DATASET_INFO_KEYS if key not in info]
    if missing:
        raise ValueError(f"dataset info lacks keys {missing}")
    path = DatasetPaths(Path(data_dir)).info
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, path)


def load_dataset_info(data_dir: Path | str) -> dict[str, Any]:
    """Read ``<data_dir>/dataset.json`` and check it has the documented keys."""
    path = DatasetPaths(Path(data_dir)).info
    _require_file(path)
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(info, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(info).__name__}")
    missing = [key for key in DATASET_INFO_KEYS if key not in info]
    if missing:
        raise DatasetError(f"{path}: missing keys {missing}")
    return info


def validate_dataset(data_dir: Path | str) -> dict[str, Any]:
    """Check every file of a dataset folder from its footer, and that the split row counts
    match ``dataset.json``. Returns the dataset info.

    Reads only Parquet footers, so it is cheap even for the 100M-row synth dataset.
    """
    paths = DatasetPaths(Path(data_dir))
    info = load_dataset_info(paths.root)
    for split in SPLITS:
        rows = check_parquet_file(paths.interactions(split), INTERACTIONS_SCHEMA)
        expected = info["counts"].get(split)
        if rows != expected:
            raise DatasetError(
                f"{paths.interactions(split)}: {rows} rows, dataset.json says {expected}"
            )
    check_parquet_file(paths.items, ITEMS_SCHEMA)
    check_parquet_file(paths.users, USERS_SCHEMA)
    return info
