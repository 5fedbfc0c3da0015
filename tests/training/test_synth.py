"""The synthetic generator on real Parquet: schema, raw ids, the split, planted signals, topics,
the preference oracle, determinism, and the length cohort the ranker debiases within.

One small dataset is generated per session (``synth``); tests that need other settings
generate their own into ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.training.split_checks import assert_leave_one_out, read_splits
from training.data.loader import build_examples
from training.data.schema import (
    SPLITS,
    DatasetError,
    DatasetPaths,
    check_parquet_file,
    load_dataset_info,
    validate_dataset,
)
from training.data.split import leave_one_out_split
from training.data.synth import (
    SYNTH_INTERACTIONS_SCHEMA,
    SYNTH_ITEMS_SCHEMA,
    SYNTH_USERS_SCHEMA,
    generate_synth,
)
from training.data.synth_world import COMMENT_CATEGORY, PreferenceOracle

SYNTH_SIZE = {"users": 2_000, "items": 1_000, "interactions": 60_000}
SYNTH_ROW_GROUP = 8_192


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> DatasetPaths:
    out = tmp_path_factory.mktemp("data") / "synth"
    generate_synth(out, seed=7, row_group_size=SYNTH_ROW_GROUP, **SYNTH_SIZE)
    return DatasetPaths(out)


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
    inter = read_splits(synth, ["user_id", "item_id"])
    for frame in inter.values():
        assert np.isin(frame.user_id, user_ids).all() and np.isin(frame.item_id, item_ids).all()


def test_synth_split_is_leave_one_out_by_time(synth: DatasetPaths) -> None:
    splits = read_splits(synth, ["user_id", "item_id", "timestamp"])
    assert_leave_one_out(splits, all_users=False)
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


def test_preference_oracle_is_the_generators_preference_without_its_noise(synth: DatasetPaths, ml100k_dir: Path) -> None:
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
        PreferenceOracle(ml100k_dir)


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


def test_synth_noise_cohort_is_an_extra_item_column_that_no_signal_depends_on(synth: DatasetPaths) -> None:
    """The misspecified-cohort benchmark's irrelevant variable: only there when asked for."""
    from training.data.ranking_examples import synth_features

    assert "noise" not in synth_features(synth.root).cohort_sizes
    features = synth_features(synth.root, noise_buckets=5)
    assert list(features.cohort_sizes) == ["activity", "length", "category", "noise"]
    noise = np.stack(features.items.column("cohorts").to_numpy(zero_copy_only=False))[:, 2]
    assert set(np.unique(noise)) == set(range(5))
    items = pq.read_table(synth.items, columns=["item_id", "item_length"]).sort_by("item_id")
    log_len = np.log(items.column("item_length").to_numpy())
    assert abs(np.corrcoef(noise, log_len)[0, 1]) < 0.1  # drawn apart from every item property
