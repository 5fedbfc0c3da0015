"""Ranking examples: (user, item, context) rows with per-task labels, features and cohorts.

Retrieval learns from positives only; the ranker learns several engagement signals per pair,
so its examples carry one label (and a label mask) per task, the features the ranker reads and
the cohort buckets that MBD (``training/models/mbd.py``) conditions on.

Two sources, one layout:

* ``movielens`` (ml-100k): tasks ``like`` (rating >= 4), ``rated`` (a rated item against
  ``negatives`` sampled unrated items per rating) and ``rating`` (regression, masked on
  unrated rows). Cohorts: ``activity`` (user rating-count quintile), ``genre`` (first genre),
  ``decade`` (release decade). Evaluation lists: each held-out rating plus ``eval_negatives``
  unrated items, relevance = the rating (0 when unrated).
* ``synth`` (``rayrec data synth``): tasks ``watch_time`` (regression), ``loop`` and
  ``comment`` (binary), with the planted biases of :mod:`training.data.synth`. Cohorts:
  ``activity`` (quintile of a_u), ``length`` (``length_buckets`` quantile buckets of item length, 20 by default), ``category``.
  Evaluation lists: a seeded ``holdout_share`` of train rows, grouped by user, relevance =
  ``true_pref`` (the generator's unbiased preference); ``bias`` = item length.

Example table columns (one row per example)::

    user_id int64, item_id int64, history list<int64>   ids, into the MPZCH tables
    dense list<float32> [F]     user features ‖ item features (FeatureTables.dense_names)
    cohorts list<int64> [C]     bucket per cohort feature (FeatureTables.cohort_sizes order)
    labels, masks list<float32> [T]   one per task, in the order the config lists tasks
    group int64, relevance, bias, true_pref float32   (evaluation sets only)

Every feature is a user-level or an item-level one, so serving rebuilds rows for any
(user, candidate) pair from :class:`FeatureTables` (exported beside the model).

Example::

    data = build_ranking_data(Path("data/ml-100k"), RankingDataSpec("movielens"), ["like", "rated", "rating"], 0)
    data.train.num_rows, data.features.dense_names, data.features.cohort_sizes
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.data.eval_sets import read_split
from training.data.feature_index import FeatureIndex, HistoryIndex, KeyedRows
from training.data.list_columns import list_column, list_matrix
from training.data.loader import build_examples, user_histories

Source = Literal["movielens", "synth"]

# Task catalogue per source: name → "binary" | "regression". A config picks tasks by name.
TASKS: dict[str, dict[str, str]] = {
    "movielens": {"like": "binary", "rated": "binary", "rating": "regression"},
    "synth": {"watch_time": "regression", "loop": "binary", "comment": "binary"},
}


@dataclass
class RankingDataSpec:
    """How ranking examples are cut (the ``data`` section of a ranker config maps onto it).

    Args:
        source: "movielens" or "synth".
        history_len: most recent items kept as the history feature.
        negatives: sampled unrated items per rating (movielens ``rated`` task).
        eval_negatives: unrated candidates added to each held-out rating (movielens).
        holdout_share: share of train rows held out for evaluation lists (synth).
        max_train_rows: keep at most this many training examples (seeded), None: all.
        max_eval_groups: keep at most this many users per evaluation set, None: all.
        length_buckets: quantile buckets of item length in the ``length`` cohort (synth). MBD
            debiases within a bucket, so length still varies inside one: more buckets leave
            less of the length bias in the value, at fewer examples per cohort.
        noise_buckets: add an item cohort feature ``noise`` with this many buckets drawn at
            random per item (synth; 0: none). No signal depends on it: the misspecified-cohort
            benchmark (``benchmarks/mbd_baselines.py``) puts it into MBD's partial feature set.
    """

    source: Source
    history_len: int = 50
    negatives: int = 2
    eval_negatives: int = 20
    holdout_share: float = 0.1
    max_train_rows: int | None = None
    max_eval_groups: int | None = None
    length_buckets: int = 20
    noise_buckets: int = 0


@dataclass
class FeatureTables:
    """Per-user and per-item features, keyed by raw id; the ranker's non-id inputs.

    Args:
        users: ``user_id`` int64 (sorted), ``dense`` list<float32> [Fu], ``cohorts`` list<int64> [Cu].
        items: ``item_id`` int64 (sorted), ``dense`` [Fi], ``cohorts`` [Ci].
        dense_names: the Fu + Fi dense feature names, user first.
        cohort_sizes: bucket count of each of the Cu + Ci cohort features, user first.
    """

    users: pa.Table
    items: pa.Table
    dense_names: list[str]
    cohort_sizes: dict[str, int] = field(default_factory=dict)

    def assemble(self, user_ids: np.ndarray, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Features of each (user, item) pair: dense ``[B, F]`` float32, cohorts ``[B, C]`` int64.

        Unknown ids get zero features and bucket 0 (a cold id still gets a prediction). Converts
        both tables first, O(users + items): for one call over a whole example table. A caller
        that looks ids up again and again (a serving scorer) keeps :meth:`index` instead.
        """
        return self.index().assemble(user_ids, item_ids)

    def index(self) -> FeatureIndex:
        """Both tables as arrays, gathered in O(ids) per lookup (:mod:`training.data.feature_index`)."""
        return FeatureIndex(KeyedRows.from_table(self.users, "user_id"), KeyedRows.from_table(self.items, "item_id"))

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.users, directory / "user_features.parquet")
        pq.write_table(self.items, directory / "item_features.parquet")

    @classmethod
    def read(cls, directory: Path, dense_names: list[str], cohort_sizes: dict[str, int]) -> FeatureTables:
        return cls(
            pq.read_table(directory / "user_features.parquet"),
            pq.read_table(directory / "item_features.parquet"),
            list(dense_names),
            dict(cohort_sizes),
        )


@dataclass
class RankingData:
    """Everything a ranker run reads: examples per split and the feature tables."""

    train: pa.Table
    valid: pa.Table
    test: pa.Table
    features: FeatureTables
    tasks: dict[str, str]
    histories: pa.Table  # user_id, history: each user's latest items (train+valid), for serving


def _quantile_bucket(values: np.ndarray, reference: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each value by the quantiles of ``reference`` (0..buckets-1)."""
    edges = np.quantile(reference, np.linspace(0, 1, buckets + 1)[1:-1])
    return np.searchsorted(edges, values, side="right").astype(np.int64)


def _feature_table(key: str, ids: np.ndarray, dense: np.ndarray, cohorts: np.ndarray) -> pa.Table:
    order = np.argsort(ids)
    return pa.table(
        {
            key: pa.array(ids[order], pa.int64()),
            "dense": list_column(dense[order].astype(np.float32)),
            "cohorts": list_column(cohorts[order].astype(np.int64)),
        }
    )


# ---------------------------------------------------------------- features per source
def movielens_features(data_dir: Path, train: pa.Table) -> FeatureTables:
    """ml-100k: user activity, age, gender; item popularity, year, genres; cohorts."""
    users = pq.read_table(data_dir / "users.parquet")
    items = pq.read_table(data_dir / "items.parquet")
    u_ids = users.column("user_id").to_numpy()
    i_ids = items.column("item_id").to_numpy()
    u_count = _counts(train.column("user_id").to_numpy(), u_ids)
    i_count = _counts(train.column("item_id").to_numpy(), i_ids)
    age = users.column("age").to_numpy(zero_copy_only=False).astype(np.float32)
    male = (pc.equal(users.column("gender"), "M").to_numpy(zero_copy_only=False)).astype(np.float32)
    u_dense = np.stack([np.log1p(u_count) / 5.0, age / 50.0, male], axis=1)
    u_coh = _quantile_bucket(u_count, u_count, 5)[:, None]

    year = items.column("year").to_numpy(zero_copy_only=False)
    missing = np.isnan(year.astype(np.float64))
    year = np.where(missing, 1990, year).astype(np.float32)
    genres = items.column("genres").combine_chunks()
    vocab = sorted(set(pc.list_flatten(genres).to_pylist()))
    flat = pc.index_in(pc.list_flatten(genres), pa.array(vocab)).to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(len(i_ids)), pc.list_value_length(genres).fill_null(0).to_numpy())
    multi_hot = np.zeros((len(i_ids), len(vocab)), np.float32)
    multi_hot[row, flat] = 1.0
    first = np.full(len(i_ids), len(vocab), np.int64)  # no genre → its own bucket
    np.minimum.at(first, row, flat)
    decade = np.where(missing, 9, np.clip((year.astype(np.int64) - 1920) // 10, 0, 8))
    i_dense = np.concatenate(
        [np.stack([np.log1p(i_count) / 6.0, (year - 1990) / 20.0, missing.astype(np.float32)], 1), multi_hot], 1
    )
    i_coh = np.stack([first, decade], axis=1)
    return FeatureTables(
        _feature_table("user_id", u_ids, u_dense, u_coh),
        _feature_table("item_id", i_ids, i_dense, i_coh),
        ["user_log_count", "user_age", "user_male", "item_log_count", "item_year", "item_year_missing"]
        + [f"genre_{g}" for g in vocab],
        {"activity": 5, "genre": len(vocab) + 1, "decade": 10},
    )


def synth_features(data_dir: Path, length_buckets: int = 20, noise_buckets: int = 0) -> FeatureTables:
    """synth: user activity a_u; item log length, category one-hot; cohorts (``length`` in
    ``length_buckets`` quantile buckets; with ``noise_buckets`` > 0 also ``noise``, a bucket
    drawn per item from a fixed seed, which no engagement signal depends on)."""
    users = pq.read_table(data_dir / "users.parquet", columns=["user_id", "activity"])
    items = pq.read_table(data_dir / "items.parquet", columns=["item_id", "category", "item_length"])
    activity = users.column("activity").to_numpy(zero_copy_only=False).astype(np.float32)
    category = items.column("category").to_numpy().astype(np.int64)
    length = items.column("item_length").to_numpy().astype(np.float32)
    num_categories = 8
    i_dense = np.concatenate([np.log(length / 60.0)[:, None], np.eye(num_categories, dtype=np.float32)[category]], 1)
    i_coh = np.stack([_quantile_bucket(length, length, length_buckets), category], axis=1)
    sizes = {"activity": 5, "length": length_buckets, "category": num_categories}
    if noise_buckets > 0:
        noise = np.random.default_rng(12_345).integers(0, noise_buckets, len(category))  # [I]
        i_coh = np.concatenate([i_coh, noise[:, None]], 1)
        sizes["noise"] = noise_buckets
    return FeatureTables(
        _feature_table("user_id", users.column("user_id").to_numpy(), activity[:, None], _quantile_bucket(activity, activity, 5)[:, None]),
        _feature_table("item_id", items.column("item_id").to_numpy(), i_dense, i_coh),
        ["user_activity", "item_log_length"] + [f"category_{c}" for c in range(num_categories)],
        sizes,
    )


def _counts(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """How often each of ``ids`` occurs in ``values``."""
    uniq, n = np.unique(values, return_counts=True)
    pos = np.searchsorted(uniq, ids).clip(max=max(len(uniq) - 1, 0))
    if not len(uniq):
        return np.zeros(len(ids), np.float32)
    return np.where(uniq[pos] == ids, n[pos], 0).astype(np.float32)


# ---------------------------------------------------------------- examples
def _pair_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """One int64 per (user, item) pair for set membership. Why a hash: ids are raw 64-bit,
    so no exact packing exists; a multiplicative mix collides with negligible probability."""
    with np.errstate(over="ignore"):
        return users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ items.astype(np.uint64)


def _sample_unrated(rng: np.random.Generator, users: np.ndarray, per_row: int, catalogue: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``per_row`` catalogue items per user row that the user has not rated; ``[N*per_row]`` each."""
    u = np.repeat(users, per_row)
    items = catalogue[rng.integers(0, len(catalogue), len(u))]
    for _ in range(5):  # resample the few that hit a rated item
        bad = np.isin(_pair_keys(u, items), seen)
        if not bad.any():
            break
        items[bad] = catalogue[rng.integers(0, len(catalogue), int(bad.sum()))]
    return u, items


def _with_features(table: pa.Table, features: FeatureTables, labels: np.ndarray, masks: np.ndarray) -> pa.Table:
    dense, cohorts = features.assemble(table.column("user_id").to_numpy(), table.column("item_id").to_numpy())
    return (
        table.append_column("dense", list_column(dense))
        .append_column("cohorts", list_column(cohorts))
        .append_column("labels", list_column(labels.astype(np.float32)))
        .append_column("masks", list_column(masks.astype(np.float32)))
    )


def _movielens_labels(rating: np.ndarray, rated: np.ndarray, tasks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    columns = {"like": (rating >= 4).astype(np.float32), "rated": rated.astype(np.float32), "rating": rating}
    mask = {"like": np.ones_like(rating), "rated": np.ones_like(rating), "rating": rated.astype(np.float32)}
    return np.stack([columns[t] for t in tasks], 1), np.stack([mask[t] for t in tasks], 1)


def _expand_with_negatives(rng, rows: pa.Table, per_row: int, catalogue: np.ndarray, seen: np.ndarray) -> pa.Table:
    """Rated rows plus ``per_row`` unrated items per row, sharing the row's user and history."""
    _, neg = _sample_unrated(rng, rows.column("user_id").to_numpy(), per_row, catalogue, seen)
    idx = np.repeat(np.arange(rows.num_rows), per_row)
    negatives = rows.take(pa.array(idx)).set_column(1, "item_id", pa.array(neg, pa.int64()))
    negatives = negatives.set_column(negatives.schema.get_field_index("rating"), "rating", pa.array(np.zeros(len(idx), np.float32)))
    rated = np.concatenate([np.ones(rows.num_rows), np.zeros(len(idx))])
    return pa.concat_tables([rows, negatives.cast(rows.schema)]).append_column("is_rated", pa.array(rated.astype(np.float32)))


def _movielens(data_dir: Path, spec: RankingDataSpec, tasks: Sequence[str], seed: int) -> RankingData:
    rng = np.random.default_rng(seed)
    train, valid, test = (read_split(data_dir, s) for s in ("train", "valid", "test"))
    everything = pa.concat_tables([train, valid, test])
    seen = np.sort(_pair_keys(everything.column("user_id").to_numpy(), everything.column("item_id").to_numpy()))
    catalogue = pq.read_table(data_dir / "items.parquet", columns=["item_id"]).column("item_id").to_numpy()
    features = movielens_features(data_dir, train)

    def labelled(rows: pa.Table, per_row: int) -> pa.Table:
        rows = _expand_with_negatives(rng, rows, per_row, catalogue, seen)
        labels, masks = _movielens_labels(rows.column("rating").to_numpy(), rows.column("is_rated").to_numpy(), tasks)
        return _with_features(rows, features, labels, masks)

    examples = build_examples(train.select(["user_id", "item_id", "rating", "timestamp"]), spec.history_len)
    examples = _cap(rng, examples.select(["user_id", "item_id", "history", "rating"]), spec.max_train_rows)
    train_examples = labelled(examples, spec.negatives)

    def eval_set(before: pa.Table, held_out: pa.Table) -> pa.Table:
        held_out = _cap_groups(rng, held_out, spec.max_eval_groups)
        hist = user_histories(before, spec.history_len)
        rows = held_out.select(["user_id", "item_id", "rating"])
        rows = rows.add_column(2, "history", histories_of(hist, rows.column("user_id").to_numpy()))
        rows = labelled(rows, spec.eval_negatives)
        n = rows.num_rows
        return (
            rows.append_column("group", rows.column("user_id"))
            .append_column("relevance", rows.column("rating"))
            .append_column("bias", pa.array(np.zeros(n, np.float32)))
            .append_column("true_pref", pa.array(np.full(n, np.nan, np.float32)))
            .sort_by("group")  # each list's rows together (negatives were appended at the end)
        )

    train_valid = pa.concat_tables([train, valid])
    return RankingData(
        _shuffle(rng, train_examples),
        eval_set(train, valid),
        eval_set(train_valid, test),
        features,
        {t: TASKS["movielens"][t] for t in tasks},
        user_histories(train_valid, spec.history_len),
    )


def _synth(data_dir: Path, spec: RankingDataSpec, tasks: Sequence[str], seed: int) -> RankingData:
    rng = np.random.default_rng(seed)
    columns = ["user_id", "item_id", "timestamp", "watch_time", "loop", "comment", "item_length", "true_pref"]
    train = pq.read_table(data_dir / "interactions" / "train.parquet", columns=columns)
    features = synth_features(data_dir, spec.length_buckets, spec.noise_buckets)
    examples = build_examples(train, spec.history_len)
    labels = np.stack([examples.column(t).to_numpy().astype(np.float32) for t in tasks], 1)
    examples = _with_features(examples, features, labels, np.ones_like(labels))
    held = rng.random(examples.num_rows) < spec.holdout_share
    keep = ["user_id", "item_id", "history", "dense", "cohorts", "labels", "masks"]
    train_rows = _cap(rng, examples.filter(pa.array(~held)).select(keep), spec.max_train_rows)
    evaluation = examples.filter(pa.array(held))
    evaluation = (
        evaluation.select(keep)
        .append_column("group", evaluation.column("user_id"))
        .append_column("relevance", evaluation.column("true_pref"))
        .append_column("bias", evaluation.column("item_length"))
        .append_column("true_pref", evaluation.column("true_pref"))
    )
    # valid and test: the held-out rows of disjoint user halves (whole lists stay together)
    odd = (pc.bit_wise_and(evaluation.column("user_id"), 1).to_numpy() == 1)
    interactions = pa.concat_tables([train.select(["user_id", "item_id", "timestamp"]),
                                     read_split(data_dir, "valid").select(["user_id", "item_id", "timestamp"])])
    return RankingData(
        _shuffle(rng, train_rows),
        _cap_groups(rng, evaluation.filter(pa.array(odd)), spec.max_eval_groups),
        _cap_groups(rng, evaluation.filter(pa.array(~odd)), spec.max_eval_groups),
        features,
        {t: TASKS["synth"][t] for t in tasks},
        user_histories(interactions, spec.history_len),
    )


def histories_of(histories: pa.Table, users: np.ndarray) -> pa.Array:
    """Each user's history from ``user_histories`` output (empty list when the user has none).
    Converts the table first: for one call; repeated lookups keep a :class:`HistoryIndex`."""
    return HistoryIndex.from_table(histories).gather(users)


def _cap(rng: np.random.Generator, table: pa.Table, limit: int | None) -> pa.Table:
    if limit is None or table.num_rows <= limit:
        return table
    return table.take(pa.array(np.sort(rng.choice(table.num_rows, limit, replace=False))))


def _cap_groups(rng: np.random.Generator, table: pa.Table, limit: int | None) -> pa.Table:
    """Keep the rows of at most ``limit`` users (a seeded sample), sorted by user."""
    users = np.unique(table.column("user_id").to_numpy())
    if limit is not None and len(users) > limit:
        users = np.sort(rng.choice(users, limit, replace=False))
        table = table.filter(pc.is_in(table.column("user_id"), pa.array(users)))
    return table.sort_by("user_id")


def _shuffle(rng: np.random.Generator, table: pa.Table) -> pa.Table:
    """One seeded shuffle: every epoch (and a resumed one) sees the same order."""
    return table.take(pa.array(rng.permutation(table.num_rows)))


def build_ranking_data(data_dir: Path, spec: RankingDataSpec, tasks: Sequence[str], seed: int) -> RankingData:
    """Examples, evaluation lists and feature tables for ``tasks`` of ``spec.source``."""
    known = TASKS[spec.source]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"tasks {unknown} are not defined for source {spec.source!r}; known: {sorted(known)}")
    build = _movielens if spec.source == "movielens" else _synth
    return build(Path(data_dir), spec, list(tasks), seed)


def label_arrays(table: pa.Table, num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """An example table's labels and masks as numpy ``[N, T]`` float32 each."""
    return list_matrix(table.column("labels"), num_tasks, np.float32), list_matrix(table.column("masks"), num_tasks, np.float32)


def batch_arrays(batch: pa.Table, num_dense: int, num_cohorts: int, num_tasks: int) -> dict[str, np.ndarray]:
    """The non-id columns of an example batch as numpy: dense ``[B, F]``, cohorts ``[B, C]``,
    labels / masks ``[B, T]`` (ids go through :func:`training.data.loader.to_kjt`)."""
    return {
        "dense": list_matrix(batch.column("dense"), num_dense, np.float32),
        "cohorts": list_matrix(batch.column("cohorts"), num_cohorts, np.int64),
        "labels": list_matrix(batch.column("labels"), num_tasks, np.float32),
        "masks": list_matrix(batch.column("masks"), num_tasks, np.float32),
    }
