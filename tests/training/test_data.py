"""The data layer on real Parquet: ml-100k from the recbole wheel, the synthetic generator, the checks.

ml-100k is prepared once per session into a temp dir by the ``ml100k_dir`` fixture of
tests/conftest.py; the wheel comes from the shared cache (``$RAYREC_CACHE`` or
``~/.cache/rayrec``), so the suite downloads it at most once per machine.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.cli import build_parser, main
from training.data.cache import default_cache_dir, fetch_recbole_wheel
from training.data.movielens import MEMBER_PREFIX, prepare_ml100k, split_leave_last_two
from training.data.schema import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    SPLITS,
    USERS_SCHEMA,
    DatasetError,
    interactions_path,
    items_path,
    load_dataset_info,
    read_parquet_checked,
    users_path,
    validate_dataset,
    validate_table,
)
from training.data.synth import CATEGORIES, EngagementModel, generate_synth, occurrence_in_chunk

SYNTH_ARGS = dict(users=5_000, items=1_000, interactions=30_000, seed=7, chunk_rows=4_096, days=30)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_synth(out, **SYNTH_ARGS)
    return out


def read_splits(data_dir: Path) -> pd.DataFrame:
    """All interactions with a ``split`` column."""
    frames = [pq.read_table(interactions_path(data_dir, s)).to_pandas().assign(split=s) for s in SPLITS]
    return pd.concat(frames, ignore_index=True)


def assert_leave_one_out(df: pd.DataFrame) -> None:
    """Per user: one test row (the last by (timestamp, item_id)), one valid row if >= 2 rows (the second last)."""
    ordered = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    per_user = ordered.groupby("user_id")
    sizes = per_user.size()
    counts = ordered.groupby(["user_id", "split"]).size().unstack(fill_value=0).reindex(columns=list(SPLITS), fill_value=0)
    assert (counts["test"] == 1).all()
    assert (counts["valid"] == (sizes >= 2).astype(int)).all()
    # The last row of each user is test, the second last valid: position from the end decides.
    from_end = per_user.cumcount(ascending=False)
    assert (ordered.loc[from_end == 0, "split"] == "test").all()
    assert (ordered.loc[from_end == 1, "split"] == "valid").all()
    assert (ordered.loc[from_end >= 2, "split"] == "train").all()
    # And in plain timestamps: test >= valid >= every train row of the user.
    last_ts = ordered.groupby(["user_id", "split"]).timestamp.agg(["min", "max"]).unstack()
    has_valid = counts["valid"] == 1
    assert (last_ts[("min", "test")][has_valid] >= last_ts[("max", "valid")][has_valid]).all()
    has_train = counts["train"] > 0
    assert (last_ts[("min", "valid")][has_train] >= last_ts[("max", "train")][has_train]).all()


# ---- ml-100k ----------------------------------------------------------------------------------


def test_ml100k_counts(ml100k_dir: Path) -> None:
    info = load_dataset_info(ml100k_dir)
    assert (info["num_interactions"], info["num_users"], info["num_items"]) == (100_000, 943, 1_682)
    assert sum(info["counts"].values()) == 100_000
    assert info["counts"]["test"] == info["counts"]["valid"] == 943
    assert pq.ParquetFile(items_path(ml100k_dir)).metadata.num_rows == 1_682
    assert pq.ParquetFile(users_path(ml100k_dir)).metadata.num_rows == 943
    df = read_splits(ml100k_dir)
    assert (len(df), df.user_id.nunique(), df.item_id.nunique()) == (100_000, 943, 1_682)
    assert info["split"]["kind"] == "leave_one_out_by_time"


def test_ml100k_schema_types(ml100k_dir: Path) -> None:
    validate_dataset(ml100k_dir)  # footers and dataset.json counts agree
    expected = {items_path(ml100k_dir): ITEMS_SCHEMA, users_path(ml100k_dir): USERS_SCHEMA}
    expected.update({interactions_path(ml100k_dir, s): INTERACTIONS_SCHEMA for s in SPLITS})
    for path, schema in expected.items():
        actual = pq.read_schema(path)
        assert actual.names == schema.names, path
        for field in schema:
            assert actual.field(field.name).type.equals(field.type), (path, field.name)


def test_ml100k_split_is_leave_one_out_and_partitions_the_source(ml100k_dir: Path) -> None:
    df = read_splits(ml100k_dir)
    assert_leave_one_out(df)
    # Union equals the source, read here straight from the wheel with pandas (not the module's reader).
    with zipfile.ZipFile(fetch_recbole_wheel(default_cache_dir())) as archive:
        raw = pd.read_csv(io.BytesIO(archive.read(f"{MEMBER_PREFIX}.inter")), sep="\t")
    raw.columns = [c.split(":")[0] for c in raw.columns]
    key = ["user_id", "item_id", "timestamp", "rating"]
    source = raw.astype({"timestamp": "int64", "rating": "float32"})[key].sort_values(key, ignore_index=True)
    ours = df[key].sort_values(key, ignore_index=True)
    pd.testing.assert_frame_equal(ours, source, check_dtype=False)
    assert not df.duplicated(["user_id", "item_id"]).any()  # no row in two splits


def test_ml100k_values(ml100k_dir: Path) -> None:
    items = pq.read_table(items_path(ml100k_dir)).to_pandas().set_index("item_id")
    assert items.loc[1, "title"] == "Toy Story"
    assert items.loc[1, "year"] == 1995
    assert list(items.loc[1, "genres"]) == ["Animation", "Children's", "Comedy"]
    assert pd.isna(items.loc[267, "year"])  # "unkonwn" in the source
    users = pq.read_table(users_path(ml100k_dir)).to_pandas().set_index("user_id")
    assert (users.loc[1, "age"], users.loc[1, "gender"], users.loc[1, "zip"]) == (24, "M", "85711")
    assert "T8H1N" in set(users["zip"])  # Canadian zips stay strings


def test_split_breaks_timestamp_ties_by_item_id() -> None:
    table = pa.table(
        {"user_id": [1, 1, 1, 1], "item_id": [30, 10, 20, 5], "rating": [1.0] * 4, "timestamp": [100, 200, 200, 50]},
        schema=INTERACTIONS_SCHEMA,
    )
    splits = split_leave_last_two(table)
    assert splits["test"]["item_id"].to_pylist() == [20]
    assert splits["valid"]["item_id"].to_pylist() == [10]
    assert splits["train"]["item_id"].to_pylist() == [5, 30]  # time order
    shuffled = split_leave_last_two(table.take([3, 2, 1, 0]))
    assert all(shuffled[s].equals(splits[s]) for s in SPLITS)


def test_prepare_is_idempotent_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "ml"
    first = prepare_ml100k(out, cache_dir=default_cache_dir())
    files = sorted(out.rglob("*.*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert prepare_ml100k(out, cache_dir=default_cache_dir()) == first
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    prepare_ml100k(out, cache_dir=default_cache_dir(), force=True)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in files)
    # An incomplete folder (dataset.json gone) is rebuilt without force.
    (out / "dataset.json").unlink()
    assert prepare_ml100k(out, cache_dir=default_cache_dir()) == first


# ---- synth ------------------------------------------------------------------------------------


def test_synth_counts_and_schema(synth_dir: Path) -> None:
    info = validate_dataset(synth_dir)
    assert info["num_interactions"] == sum(info["counts"].values()) == SYNTH_ARGS["interactions"]
    assert pq.ParquetFile(users_path(synth_dir)).metadata.num_rows == SYNTH_ARGS["users"]
    assert pq.ParquetFile(items_path(synth_dir)).metadata.num_rows == SYNTH_ARGS["items"]
    for split in SPLITS:
        schema = pq.read_schema(interactions_path(synth_dir, split))
        for name, kind in [("item_length", pa.float32()), ("watch_time", pa.float32()), ("loop", pa.int8()),
                           ("comment", pa.int8()), ("base_activity", pa.float32()), ("true_pref", pa.float32())]:  # fmt: skip
            assert schema.field(name).type == kind
    assert pq.read_schema(items_path(synth_dir)).field("category").type == pa.int32()
    assert info["generator"]["config"]["seed"] == SYNTH_ARGS["seed"]


def test_synth_ids_are_raw_64_bit(synth_dir: Path) -> None:
    users = pq.read_table(users_path(synth_dir))["user_id"].to_numpy()
    items = pq.read_table(items_path(synth_dir))["item_id"].to_numpy()
    for ids in (users, items):
        assert ids.dtype == np.int64 and (ids >= 0).all()
        assert len(np.unique(ids)) == len(ids)
        assert ids.max() > 2**40  # spread over int63, nowhere near dense 0..n-1
    df = read_splits(synth_dir)
    assert np.isin(df.user_id, users).all() and np.isin(df.item_id, items).all()


def test_synth_split_and_time_order(synth_dir: Path) -> None:
    df = read_splits(synth_dir)
    assert_leave_one_out(df)
    info = load_dataset_info(synth_dir)
    assert info["num_active_users"] == df.user_id.nunique()
    for split in SPLITS:  # each file is written in time order
        ts = pq.read_table(interactions_path(synth_dir, split), columns=["timestamp"])["timestamp"].to_numpy()
        assert (np.diff(ts) >= 0).all()


def test_synth_item_churn(synth_dir: Path) -> None:
    df = read_splits(synth_dir).sort_values("timestamp")
    items = pq.read_table(items_path(synth_dir)).to_pandas()
    born = df.merge(items[["item_id", "birth_timestamp"]], on="item_id")
    assert (born.timestamp >= born.birth_timestamp).all()  # never sampled before birth
    quarter = len(df) // 4
    early, late = set(df.item_id.iloc[:quarter]), set(df.item_id.iloc[-quarter:])
    new_late = late - early
    assert len(new_late) > 50  # new IDs keep appearing
    start = items.birth_timestamp.min()
    assert (items.set_index("item_id").loc[list(new_late), "birth_timestamp"] > start).mean() > 0.5


def test_synth_shards_are_bounded(synth_dir: Path) -> None:
    files = [interactions_path(synth_dir, s) for s in SPLITS] + [users_path(synth_dir), items_path(synth_dir)]
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert max(sizes) <= SYNTH_ARGS["chunk_rows"], (path, sizes)
    assert pq.ParquetFile(interactions_path(synth_dir, "train")).metadata.num_row_groups >= 7  # 30k / 4096


def test_synth_planted_biases(synth_dir: Path) -> None:
    df = read_splits(synth_dir)
    items = pq.read_table(items_path(synth_dir), columns=["item_id", "category"]).to_pandas()
    df = df.merge(items, on="item_id")
    short, long = df[df.item_length < df.item_length.quantile(0.25)], df[df.item_length > df.item_length.quantile(0.75)]
    assert long.watch_time.mean() > 3 * short.watch_time.mean()  # watch time grows with length
    assert short["loop"].mean() > 2 * long["loop"].mean()  # loops fall with length
    news = df.category == EngagementModel().comment_category
    assert CATEGORIES[EngagementModel().comment_category] == "news"
    assert df[news].comment.mean() > 1.5 * df[~news].comment.mean()  # one content type draws comments
    assert np.corrcoef(df.true_pref, df.rating)[0, 1] > 0.6
    # Users pick what they like among popular candidates: a random (user, item) pair has
    # E[true_pref] = 0, chosen pairs sit well above it.
    assert df.true_pref.mean() > 0.4
    # Activity is heavy-tailed: the busiest 1% of users make far more than 1% of interactions.
    per_user = df.user_id.value_counts()
    assert per_user.iloc[: max(1, len(per_user) // 100)].sum() > 0.05 * len(df)


def test_synth_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    small = dict(users=300, items=200, interactions=3_000, chunk_rows=1_000, days=5)
    a = generate_synth(tmp_path / "a", seed=3, **small)
    generate_synth(tmp_path / "b", seed=3, **small)
    generate_synth(tmp_path / "c", seed=4, **small)
    for name in [f"interactions/{s}.parquet" for s in SPLITS] + ["items.parquet", "users.parquet"]:
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name)), name
    other = pq.read_table(tmp_path / "c" / "items.parquet")["item_id"].to_numpy()
    assert not np.isin(pq.read_table(tmp_path / "a" / "items.parquet")["item_id"].to_numpy(), other).any()
    # Re-running the same config is a no-op; another config rebuilds.
    stamp = (tmp_path / "a" / "items.parquet").stat().st_mtime_ns
    assert generate_synth(tmp_path / "a", seed=3, **small) == a
    assert (tmp_path / "a" / "items.parquet").stat().st_mtime_ns == stamp
    assert generate_synth(tmp_path / "a", seed=5, **small)["generator"]["config"]["seed"] == 5


def test_occurrence_counts_across_chunks() -> None:
    seen = np.zeros(4, dtype=np.int32)
    assert occurrence_in_chunk(np.array([2, 0, 2, 2, 3]), seen).tolist() == [0, 0, 1, 2, 0]
    assert occurrence_in_chunk(np.array([2, 1, 0]), seen).tolist() == [3, 0, 1]
    assert seen.tolist() == [2, 1, 4, 1]


# ---- schema checks ----------------------------------------------------------------------------


def _interactions(**overrides: pa.Array) -> pa.Table:
    columns = {
        "user_id": pa.array([1, 2], pa.int64()),
        "item_id": pa.array([3, 4], pa.int64()),
        "rating": pa.array([1.0, 2.0], pa.float32()),
        "timestamp": pa.array([5, 6], pa.int64()),
    }
    columns.update(overrides)
    return pa.table({k: v for k, v in columns.items() if v is not None})


def test_checker_names_file_for_corrupt_and_empty_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DatasetError, match=r"garbage\.parquet.*unreadable"):
        read_parquet_checked(garbage, INTERACTIONS_SCHEMA)

    truncated = tmp_path / "truncated.parquet"
    pq.write_table(_interactions(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    with pytest.raises(DatasetError, match=r"truncated\.parquet"):
        read_parquet_checked(truncated, INTERACTIONS_SCHEMA)

    empty_file = tmp_path / "zero.parquet"
    empty_file.touch()
    with pytest.raises(DatasetError, match=r"zero\.parquet.*empty"):
        read_parquet_checked(empty_file, INTERACTIONS_SCHEMA)

    no_rows = tmp_path / "norows.parquet"
    pq.write_table(_interactions().slice(0, 0), no_rows)
    with pytest.raises(DatasetError, match=r"norows\.parquet.*empty \(0 rows\)"):
        read_parquet_checked(no_rows, INTERACTIONS_SCHEMA)

    with pytest.raises(DatasetError, match=r"absent\.parquet.*not found"):
        read_parquet_checked(tmp_path / "absent.parquet", INTERACTIONS_SCHEMA)


def test_checker_names_file_and_column(tmp_path: Path) -> None:
    missing = tmp_path / "missing.parquet"
    pq.write_table(_interactions(rating=None), missing)
    with pytest.raises(DatasetError, match=r"missing\.parquet: missing column 'rating'"):
        read_parquet_checked(missing, INTERACTIONS_SCHEMA)

    wrong = tmp_path / "wrong.parquet"
    pq.write_table(_interactions(timestamp=pa.array(["a", "b"])), wrong)
    with pytest.raises(DatasetError, match=r"wrong\.parquet: column 'timestamp' has type string, expected int64"):
        read_parquet_checked(wrong, INTERACTIONS_SCHEMA)

    # In memory too; a float64 rating is a wrong type, extra columns are fine.
    with pytest.raises(DatasetError, match=r"mem\.parquet: column 'rating' has type double"):
        validate_table(Path("mem.parquet"), _interactions(rating=pa.array([1.0, 2.0])), INTERACTIONS_SCHEMA)
    validate_table(Path("ok.parquet"), _interactions(extra=pa.array([0, 1])), INTERACTIONS_SCHEMA)
    good = tmp_path / "good.parquet"
    pq.write_table(_interactions(), good)
    assert read_parquet_checked(good, INTERACTIONS_SCHEMA).num_rows == 2


def test_dataset_info_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset.json: file not found"):
        load_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "num_users": 1}))
    with pytest.raises(DatasetError, match="num_items"):
        load_dataset_info(tmp_path)


# ---- command line -----------------------------------------------------------------------------


def test_cli_help_and_underscored_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["data", "synth", "--users", "10_000_000", "--interactions", "100_000_000"])
    assert (args.users, args.interactions) == (10_000_000, 100_000_000)
    assert callable(args.handler)
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "synth", "--users", "0"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert "data" in top and "build datasets" in top
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "--help"])
    data_help = capsys.readouterr().out
    assert "prepare" in data_help and "synth" in data_help


def test_cli_synth_writes_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    assert main(["data", "synth", "--out", str(out), "--users", "200", "--items", "100", "--interactions", "2_000"]) == 0
    assert "2,000 interactions" in capsys.readouterr().out
    assert validate_dataset(out)["num_interactions"] == 2_000
