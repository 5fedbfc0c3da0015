"""The generative model behind :mod:`training.data.synth`: who exists, who sees what, and how
they engage. :mod:`training.data.synth` writes it out as Parquet; :class:`PreferenceOracle`
answers "how much does this user truly like this item" for benchmarks that score against the
truth.

Generative model (each constant is named in the code below):

- **IDs**: users and items get distinct random non-negative int63 IDs (not dense, not ordered).
- **Time**: interactions span ``days`` days from ``START_TS``; timestamps (seconds) never
  decrease along the stream.
- **Items** (I): a content type ``category`` c_i ∈ {0..7} (``CATEGORY_NAMES``), a length L_i in
  seconds (log-normal around a per-category median, ``CATEGORY_MEDIAN_LENGTH_S``), a hidden
  quality q_i ~ N(0, 0.5²), and a Zipf popularity weight ``rank^-item_zipf`` over a random rank.
  **Churn**: ``initial_item_fraction`` of the catalogue exists before the start (born over the
  previous 5 years); the rest are born uniformly during the span. An item is only ever sampled
  after its ``birth_ts``. ``genres`` holds the category's name (plus a second one for 30% of
  items), ``title`` and ``year`` (the birth year) are synthetic.
- **Users** (U): a Zipf activity weight ``rank^-user_zipf`` over a random rank decides how often
  a user appears; the base activity a_u = 1 - (rank-1)/U ∈ (0, 1] is the same ranking as a
  number (heavy users near 1). Tastes: a favourite and a second category.
- **Exposure** (one interaction): the user is drawn by activity weight; with probability
  ``taste_share`` the item is drawn from the user's favourite category, else from the whole
  catalogue, in both cases by Zipf weight among the items already born.
- **True preference** (the unbiased signal): z = 1.5·[c_i = fav_u] + 0.5·[c_i = second_u]
  + s·[c_i = c_prev] + q_i + ε - 0.75 with ε ~ N(0, 0.5²); ``true_pref`` = σ(z). The session
  term (s = ``session_weight``) is short-term intent: an item of the same category as the
  user's previous exposure c_prev is preferred. It is what a model over the *ordered* history
  (the foundation model) can see and a model over user and item ids and a pooled history
  mostly cannot, so the FM has a real gain to measure.
- **Observed engagement**, each with a planted bias, with ℓ = ln(L_i / 60 s):

  - ``watch_time`` = L_i · σ(0.5 + 1.5z + (a_u - 0.5) - 0.4ℓ + N(0, 0.3²)): grows with item
    length (duration bias) and with user activity.
  - ``loop`` ~ Bernoulli(σ(-1 + z - ℓ + 0.5(a_u - 0.5))): falls with item length.
  - ``comment`` ~ Bernoulli(σ(-3.5 + 0.8z + 1.5·[c_i = COMMENT_CATEGORY] + 1.5a_u)): higher
    for one content type ("live") and for active users.
  - ``rating`` = 1.0 (implicit feedback; the column exists so the layout matches ml-100k).

- **Topics** (off unless ``topics`` > 0; the files are then bit-identical to a world without
  them): categories alone cannot tell one new item from the 1/8 of the catalogue that shares its
  category, so no model can retrieve a cold item from content. With T topics, item i gets a topic
  t_i among its category's T/8 (its title is ``synth item t<topic>``), user u a
  favourite topic t_u inside their favourite category, z gains ``topic_weight``·[t_i = t_u], and
  with probability ``topic_share`` an exposure comes from the user's topic feed: an item of t_u
  born by then, drawn *uniformly* rather than by popularity. That feed is where new and niche
  items get their first views, and the title word is the content signal that can find them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.schema import DatasetError, load_dataset_info

START_TS = 1_735_689_600  # 2025-01-01T00:00:00Z
CATEGORY_NAMES = ("music", "comedy", "gaming", "live", "sports", "cooking", "travel", "education")
CATEGORY_MEDIAN_LENGTH_S = (30.0, 20.0, 90.0, 300.0, 45.0, 60.0, 120.0, 240.0)
COMMENT_CATEGORY = CATEGORY_NAMES.index("live")
OCCUPATIONS = (
    "student", "engineer", "artist", "writer", "educator", "healthcare", "retired", "other",
)  # fmt: skip
_SECONDS_PER_DAY = 86_400
_MAX_INT63 = np.iinfo(np.int64).max


@dataclass(frozen=True)
class SynthConfig:
    """Size and shape of a synthetic dataset; recorded in dataset.json as ``generator``.

    Args:
        users: number of users (U).
        items: number of items (I), including those born during the span.
        interactions: number of interactions (N).
        seed: the one seed everything derives from.
        row_group_size: rows generated per chunk and written per Parquet row group; bounds memory.
        days: length of the interaction span.
        initial_item_fraction: share of items that exist before the span starts.
        item_zipf: Zipf exponent of item popularity.
        user_zipf: Zipf exponent of user activity.
        taste_share: probability an exposure is drawn from the user's favourite category.
        session_weight: preference boost s for an item of the category of the user's previous
            exposure (0 turns the session term off).
        topics: number of fine-grained topics nested in the categories (0: none, the world of
            earlier releases, bit for bit). A multiple of the 8 categories; see "Topics" in the
            module docstring.
        topic_share: probability an exposure comes from the user's favourite topic's feed
            (only with ``topics``).
        topic_weight: preference boost for an item of the user's favourite topic.
    """

    users: int = 10_000
    items: int = 5_000
    interactions: int = 200_000
    seed: int = 0
    row_group_size: int = 1_000_000
    days: int = 90
    initial_item_fraction: float = 0.3
    item_zipf: float = 1.0
    user_zipf: float = 0.7
    taste_share: float = 0.6
    session_weight: float = 1.5
    topics: int = 0
    topic_share: float = 0.3
    topic_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("users", "items", "interactions", "row_group_size", "days"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_chunks > self.days * _SECONDS_PER_DAY:
            raise ValueError("more chunks than seconds in the span: raise row_group_size or days")
        if not 0.0 < self.initial_item_fraction <= 1.0:
            raise ValueError("initial_item_fraction must be in (0, 1]")
        if not 0.0 <= self.taste_share <= 1.0:
            raise ValueError("taste_share must be in [0, 1]")
        if self.topics < 0 or self.topics % len(CATEGORY_NAMES):
            raise ValueError(f"topics must be 0 or a positive multiple of {len(CATEGORY_NAMES)}, got {self.topics}")
        if not 0.0 <= self.topic_share <= 1.0:
            raise ValueError("topic_share must be in [0, 1]")

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.interactions / self.row_group_size)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _unique_int63(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random non-negative int64 IDs (redrawn in the ~1e-5 case of a collision)."""
    while True:
        ids = rng.integers(0, _MAX_INT63, size=n, dtype=np.int64)
        # sort + diff, not np.unique: numpy 2.4's unique took 15 s for 10M IDs here, sort 0.1 s
        if (np.diff(np.sort(ids)) != 0).all():
            return ids


def _zipf_weights(
    rng: np.random.Generator, n: int, exponent: float
) -> tuple[np.ndarray, np.ndarray]:
    """Random ranks 1..n and their weights rank^-exponent, both [n]."""
    ranks = rng.permutation(n).astype(np.int64) + 1
    return ranks, ranks.astype(np.float64) ** -exponent


def _draw_weighted_prefix(
    rng: np.random.Generator, cum_weight: np.ndarray, prefix_len: np.ndarray
) -> np.ndarray:
    """For each row, an index in ``[0, prefix_len)`` drawn by weight.

    ``cum_weight`` [M] is the running sum of weights; ``prefix_len`` [n] (each >= 1) says how
    many leading entries are eligible (items born so far, in birth order). Inverse-CDF sampling:
    one vectorised searchsorted for the whole chunk instead of a draw per row.
    """
    target = rng.random(len(prefix_len)) * cum_weight[prefix_len - 1]  # [n]
    # Searching sorted targets is ~15x faster on a 10M-entry table (cache-friendly); the
    # results go back to the rows they were drawn for.
    order = np.argsort(target)
    drawn = np.empty(len(target), dtype=np.int64)
    drawn[order] = np.searchsorted(cum_weight, target[order], side="right")
    return np.minimum(drawn, prefix_len - 1)  # guards float rounding at the prefix's end


@dataclass
class World:
    """Everything fixed before the first interaction: arrays over users [U] and items [I].

    Items are stored in birth order, so "the items born by time t" is a prefix.
    """

    user_ids: np.ndarray  # [U] int64 raw IDs
    user_activity: np.ndarray  # [U] float32, a_u
    user_cum_weight: np.ndarray  # [U] float64, running sum of Zipf activity weights
    user_fav: np.ndarray  # [U] int8 favourite category
    user_second: np.ndarray  # [U] int8 second category
    item_ids: np.ndarray  # [I] int64 raw IDs, birth order
    item_birth: np.ndarray  # [I] int64 seconds, ascending
    item_category: np.ndarray  # [I] int8
    item_length: np.ndarray  # [I] float32 seconds
    item_quality: np.ndarray  # [I] float32, hidden
    item_cum_weight: np.ndarray  # [I] float64, running sum of Zipf weights in birth order
    category_items: list[np.ndarray]  # per category: its item indices [I_c], birth order
    category_cum_weight: list[np.ndarray]  # per category: running weight sum [I_c]
    category_birth: list[np.ndarray]  # per category: birth times [I_c], ascending
    topics: _Topics | None = None  # with SynthConfig.topics > 0


@dataclass
class _Topics:
    """Fine-grained topics: each item's, each user's favourite, and the topic feed's index.

    ``feed_key`` sorts the items by (topic, birth) as one int64 key, topic · 2^40 + seconds since
    ``birth_origin``, so "the items of topic t born by time s" is one searchsorted for a whole
    chunk: ``feed_start[t]`` is where topic t's run of ``feed_items`` begins.
    """

    item_topic: np.ndarray  # [I] int32
    user_topic: np.ndarray  # [U] int32, inside the user's favourite category
    weight: float  # preference boost for the favourite topic
    feed_items: np.ndarray  # [I] int64 item indices by (topic, birth)
    feed_key: np.ndarray  # [I] int64 ascending
    feed_start: np.ndarray  # [T] int64
    birth_origin: int

    @classmethod
    def build(cls, cfg: SynthConfig, item_category: np.ndarray, item_birth: np.ndarray,
              user_fav: np.ndarray) -> _Topics:  # fmt: skip
        # Its own random stream, so switching topics on leaves every other draw as it was.
        rng = np.random.default_rng([cfg.seed, 5])
        num_categories = len(CATEGORY_NAMES)
        per_category = cfg.topics // num_categories
        # topic t belongs to category t mod C
        item_topic = (item_category + num_categories * rng.integers(0, per_category, len(item_category))).astype(np.int32)
        user_topic = (user_fav + num_categories * rng.integers(0, per_category, len(user_fav))).astype(np.int32)
        origin = int(item_birth.min())
        key = (item_topic.astype(np.int64) << 40) + (item_birth - origin)
        order = np.argsort(key, kind="stable")
        feed_key = key[order]
        feed_start = np.searchsorted(feed_key, np.arange(cfg.topics, dtype=np.int64) << 40)
        return cls(item_topic, user_topic, cfg.topic_weight, order, feed_key, feed_start, origin)

    def draw_feed(self, rng: np.random.Generator, users: np.ndarray, timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row, an item of the user's favourite topic born by then, drawn *uniformly*
        (a followed topic's feed ranks by relevance, not popularity, so new and niche items get
        shown). Returns (item indices, ok): rows whose topic had no item born yet are not ok."""
        topic = self.user_topic[users].astype(np.int64)
        born_end = np.searchsorted(self.feed_key, (topic << 40) + (timestamps - self.birth_origin), side="right")
        born = born_end - self.feed_start[topic]  # [n] items of the topic born so far
        ok = born > 0
        pick = self.feed_start[topic] + np.floor(rng.random(len(users)) * np.maximum(born, 1)).astype(np.int64)
        return self.feed_items[np.minimum(pick, born_end - 1).clip(min=0)], ok


def build_world(cfg: SynthConfig) -> World:
    rng = np.random.default_rng([cfg.seed, 0])
    num_categories = len(CATEGORY_NAMES)

    user_ids = _unique_int63(rng, cfg.users)
    user_rank, user_weight = _zipf_weights(rng, cfg.users, cfg.user_zipf)
    user_activity = (1.0 - (user_rank - 1) / cfg.users).astype(np.float32)
    user_fav = rng.integers(0, num_categories, cfg.users).astype(np.int8)
    # Second category: any other one (an offset of 1..C-1 from the favourite).
    offset = rng.integers(1, num_categories, cfg.users)
    user_second = ((user_fav + offset) % num_categories).astype(np.int8)
    del user_rank, offset

    item_ids = _unique_int63(rng, cfg.items)
    num_initial = max(1, round(cfg.items * cfg.initial_item_fraction))
    span = cfg.days * _SECONDS_PER_DAY
    before = rng.integers(START_TS - 5 * 365 * _SECONDS_PER_DAY, START_TS, num_initial)
    during = rng.integers(START_TS, START_TS + span, cfg.items - num_initial)
    item_birth = np.sort(np.concatenate([before, during])).astype(np.int64)
    item_category = rng.integers(0, num_categories, cfg.items).astype(np.int8)
    median_length = np.asarray(CATEGORY_MEDIAN_LENGTH_S)[item_category]
    item_length = np.clip(median_length * np.exp(rng.normal(0.0, 0.6, cfg.items)), 3.0, 3600.0)
    item_quality = rng.normal(0.0, 0.5, cfg.items).astype(np.float32)
    _, item_weight = _zipf_weights(rng, cfg.items, cfg.item_zipf)

    category_items = [np.flatnonzero(item_category == c) for c in range(num_categories)]
    topics = _Topics.build(cfg, item_category, item_birth, user_fav) if cfg.topics else None
    return World(
        user_ids=user_ids,
        user_activity=user_activity,
        user_cum_weight=np.cumsum(user_weight),
        user_fav=user_fav,
        user_second=user_second,
        item_ids=item_ids,
        item_birth=item_birth,
        item_category=item_category,
        item_length=item_length.astype(np.float32),
        item_quality=item_quality,
        item_cum_weight=np.cumsum(item_weight),
        category_items=category_items,
        category_cum_weight=[np.cumsum(item_weight[idx]) for idx in category_items],
        category_birth=[item_birth[idx] for idx in category_items],
        topics=topics,
    )


@dataclass
class Chunk:
    """One chunk of the interaction stream, sorted by (timestamp, item_id); arrays are [n]."""

    start: int  # global stream position of the first row
    users: np.ndarray  # int64 user indices into World
    items: np.ndarray  # int64 item indices into World
    timestamps: np.ndarray  # int64 seconds


def _chunk_time_range(cfg: SynthConfig, k: int) -> tuple[int, int]:
    """Disjoint [lo, hi) second ranges, so sorting inside each chunk sorts the whole stream."""
    span = cfg.days * _SECONDS_PER_DAY
    return START_TS + k * span // cfg.num_chunks, START_TS + (k + 1) * span // cfg.num_chunks


def exposures(cfg: SynthConfig, world: World, k: int) -> Chunk:
    """Who saw what when in chunk ``k``; both passes regenerate it identically."""
    rng = np.random.default_rng([cfg.seed, 1, k])
    start = k * cfg.row_group_size
    n = min(cfg.row_group_size, cfg.interactions - start)
    lo, hi = _chunk_time_range(cfg, k)
    timestamps = rng.integers(lo, hi, n, dtype=np.int64)  # ordered below, with item_id

    every_user = np.full(n, len(world.user_ids), dtype=np.int64)  # the whole user list is eligible
    users = _draw_weighted_prefix(rng, world.user_cum_weight, every_user)
    born = np.searchsorted(world.item_birth, timestamps, side="right")  # >= 1: initial items
    items = _draw_weighted_prefix(rng, world.item_cum_weight, born)

    from_taste = rng.random(n) < cfg.taste_share
    fav = world.user_fav[users]
    per_category = zip(world.category_items, world.category_cum_weight, world.category_birth)
    for category, (members, cum_weight, birth) in enumerate(per_category):
        rows = np.flatnonzero(from_taste & (fav == category))
        born_here = np.searchsorted(birth, timestamps[rows], side="right")
        rows, born_here = rows[born_here > 0], born_here[born_here > 0]  # else keep global draw
        items[rows] = members[_draw_weighted_prefix(rng, cum_weight, born_here)]
    if world.topics is not None and cfg.topic_share > 0:
        topic_rng = np.random.default_rng([cfg.seed, 6, k])  # its own stream: see _Topics
        from_feed = np.flatnonzero(topic_rng.random(n) < cfg.topic_share)
        drawn, ok = world.topics.draw_feed(topic_rng, users[from_feed], timestamps[from_feed])
        items[from_feed[ok]] = drawn[ok]

    order = np.lexsort((world.item_ids[items], timestamps))  # by timestamp, then item_id
    return Chunk(start, users[order], items[order], timestamps[order])


def previous_category(world: World, chunk: Chunk, last: np.ndarray) -> np.ndarray:
    """Each row's user's previous exposure's category ``[n]`` (-1 before their first).

    ``last`` ``[U]`` carries every user's latest category across chunks (chunks come in stream
    order) and is updated in place: O(U) bytes of state, like the split's tracker.
    """
    category = world.item_category[chunk.items]
    order = np.argsort(chunk.users, kind="stable")  # by user, stream order within a user
    users, cats = chunk.users[order], category[order]
    first = np.ones(len(users), dtype=bool)
    first[1:] = users[1:] != users[:-1]
    prev_sorted = np.empty(len(users), dtype=np.int8)
    prev_sorted[1:] = cats[:-1]
    prev_sorted[first] = last[users[first]]
    previous = np.empty_like(prev_sorted)
    previous[order] = prev_sorted
    final = np.ones(len(users), dtype=bool)  # a user's last row in this chunk
    final[:-1] = users[1:] != users[:-1]
    last[users[final]] = cats[final]
    return previous


def _preference_logit(
    world: World, users: np.ndarray, items: np.ndarray, previous: np.ndarray, session_weight: float,
    noise: np.ndarray | float = 0.0,
) -> np.ndarray:  # fmt: skip
    """The preference logit z (module docstring) of N (user, item) pairs ``[N]``: ``users`` /
    ``items`` index ``world``, ``previous`` is the category of each user's previous exposure (-1:
    none), ``noise`` is ε (0: the expected logit z̄). One function for the generator and the
    oracle, so the two cannot drift apart."""
    category = world.item_category[items]
    match = (
        1.5 * (category == world.user_fav[users])
        + 0.5 * (category == world.user_second[users])
        + session_weight * (category == previous)
    )
    if world.topics is not None:
        match = match + world.topics.weight * (world.topics.item_topic[items] == world.topics.user_topic[users])
    return match + world.item_quality[items] + noise - 0.75  # the generator's order of terms: bit-identical files


class PreferenceOracle:
    """The generator's ground truth for any (user, item) pair, for evaluation only.

    The ``true_pref`` column scores the pairs that were exposed; a benchmark that ranks
    *other* pairs (a served top-10 from 50 retrieved candidates) needs the same preference for
    pairs that never happened. It rebuilds the generator's world from ``dataset.json`` (the
    world is a function of the generator settings alone) and returns σ(z̄), the preference
    without the noise ε: ε is drawn per exposure, so it is not part of what a user prefers.

    Example::

        oracle = PreferenceOracle(Path("data/synth-ranker"))
        oracle.preference(user_ids, item_ids, oracle.category(last_item_ids))  # [N] in (0, 1)
    """

    def __init__(self, data_dir: Path) -> None:
        generator = load_dataset_info(Path(data_dir)).get("generator")
        if generator is None:
            raise DatasetError(f"{data_dir} is not a synth dataset: dataset.json has no generator settings")
        self.config = SynthConfig(**generator)
        self._world = build_world(self.config)
        self._user_pos = _positions(self._world.user_ids)
        self._item_pos = _positions(self._world.item_ids)

    def _lookup(self, positions: tuple[np.ndarray, np.ndarray], ids: np.ndarray, kind: str) -> np.ndarray:
        sorted_ids, order = positions
        ids = np.asarray(ids, dtype=np.int64)
        at = np.searchsorted(sorted_ids, ids).clip(max=len(sorted_ids) - 1)
        if not (sorted_ids[at] == ids).all():
            raise KeyError(f"{kind} ids not in this synth dataset: {ids[sorted_ids[at] != ids][:5].tolist()}")
        return order[at]

    def category(self, item_ids: np.ndarray) -> np.ndarray:
        """Content type of each raw item id ``[N]`` (int8)."""
        return self._world.item_category[self._lookup(self._item_pos, item_ids, "item")]

    def preference(self, user_ids: np.ndarray, item_ids: np.ndarray, previous_category: np.ndarray) -> np.ndarray:
        """σ(z̄) ``[N]`` for raw ids ``[N]`` given each user's previous exposure's category ``[N]``."""
        users = self._lookup(self._user_pos, user_ids, "user")
        items = self._lookup(self._item_pos, item_ids, "item")
        return _sigmoid(_preference_logit(self._world, users, items, np.asarray(previous_category), self.config.session_weight))


def _positions(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their positions in ``ids``) for vectorised raw id → index lookups."""
    order = np.argsort(ids)
    return ids[order], order


def engagement_columns(
    cfg: SynthConfig, world: World, chunk: Chunk, k: int, previous: np.ndarray
) -> dict[str, np.ndarray]:
    """The chunk's rows, each column ``[n]``, with the planted engagement signals (see the
    module docstring); ``previous`` ``[n]`` is each row's :func:`previous_category`."""
    rng = np.random.default_rng([cfg.seed, 2, k])
    n = len(chunk.users)
    category = world.item_category[chunk.items]
    length = world.item_length[chunk.items].astype(np.float64)
    activity = world.user_activity[chunk.users].astype(np.float64)
    z = _preference_logit(world, chunk.users, chunk.items, previous, cfg.session_weight, rng.normal(0.0, 0.5, n))
    log_length = np.log(length / 60.0)
    completion = _sigmoid(
        0.5 + 1.5 * z + (activity - 0.5) - 0.4 * log_length + rng.normal(0.0, 0.3, n)
    )
    loop = rng.random(n) < _sigmoid(-1.0 + z - log_length + 0.5 * (activity - 0.5))
    comment = rng.random(n) < _sigmoid(
        -3.5 + 0.8 * z + 1.5 * (category == COMMENT_CATEGORY) + 1.5 * activity
    )
    columns = {
        "user_id": world.user_ids[chunk.users],
        "item_id": world.item_ids[chunk.items],
        "rating": np.ones(n, dtype=np.float32),
        "timestamp": chunk.timestamps,
        "item_length": length.astype(np.float32),
        "watch_time": (length * completion).astype(np.float32),
        "loop": loop.astype(np.int8),
        "comment": comment.astype(np.int8),
        "user_activity": activity.astype(np.float32),
        "true_pref": _sigmoid(z).astype(np.float32),
    }
    return columns
