"""From new feedback positives to two-tower training examples, sized so no event is dropped.

Two steps, both on the driver:

* :func:`feedback_examples`: each new positive (user u, item i, time t) becomes one example
  ``(user_id, item_id, history)`` whose history is u's previous ``history_len`` items, oldest
  first, drawn from the run's interactions (the dataset's train+valid plus every feedback
  positive already trained) and the new positives before it. Examples keep the log order and
  carry ``seq``, their position in it (0..N-1), which is what a job reports as trained.
* :func:`with_replay`: mixes in examples of older interactions, drawn at random from the
  run's interactions (``continual.replay`` per new positive), shuffled together with the new
  ones. Why: a continued job sees a few new events, so its in-batch softmax has few and
  unrepresentative negatives, and a new item's fresh row is pushed toward its clickers with
  nothing pushing it away from everyone else (in the loop benchmark an item with 4 clicks went
  from 18 to 292 of 943 users' top 10); replayed rows are the negatives a full retrain would
  have given it, and they hold the rest of the model where it was (forgetting). They carry
  ``seq`` -1: they are not events, so the exactly-once record counts only the new ones. Off by
  default (``continual.replay`` 0): on a drifting stream it cost quality (replay 1: true NDCG@10
  -0.018 ± 0.005, next-day Recall@10 -0.024 ± 0.007 over 3 seeds; docs/benchmarks/continual_replay.md):
  uniform replay pulls the model back toward old tastes and old items.
* :func:`pad_for_workers`: Ray Train's workers each take an equal share in full batches
  (``drop_last``; every rank must step the same number of times). N rarely divides evenly, and
  a dropped example would be an event skipped forever (the watermark moves past it), so the
  table is padded with copies of its last row carrying ``weight`` 0: a zero-weight row adds no
  loss and is no negative for others (``in_batch_softmax_loss``), so it trains nothing.

Notation: N new positives, W workers, b rows per worker per step, S steps.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.loader import build_examples


def feedback_examples(history: pa.Table, new: pa.Table, history_len: int) -> pa.Table:
    """Examples for the ``new`` positives, with histories from ``history`` and earlier new ones.

    Args:
        history: interactions already in the model: ``user_id, item_id, timestamp`` (any order).
        new: N new positives in log order: ``user_id, item_id, timestamp``.
        history_len: L, most recent items kept in a history.

    Returns:
        N rows ``user_id, item_id, history (list<int64>, ≤ L), seq (int64, 0..N-1)`` in log order.
        Within a user, time order is ``timestamp`` then (new events) the log order.
    """
    cols = ["user_id", "item_id", "timestamp"]
    schema = pa.schema([(c, pa.int64()) for c in cols])
    old = history.select(cols).cast(schema).append_column("seq", pa.array(np.full(history.num_rows, -1), pa.int64()))
    fresh = new.select(cols).cast(schema).append_column("seq", pa.array(np.arange(new.num_rows), pa.int64()))
    both = pa.concat_tables([old, fresh])
    # build_examples orders by (user, timestamp, item_id); rank ties by seq first so two new
    # events of one second keep the order they were received in (old rows, seq -1, come first)
    tie = pc.sort_indices(both, sort_keys=[("user_id", "ascending"), ("timestamp", "ascending"), ("seq", "ascending")])
    rank = np.empty(both.num_rows, dtype=np.int64)
    rank[tie.to_numpy()] = np.arange(both.num_rows)
    ordered = both.set_column(2, "timestamp", pa.array(rank, pa.int64()))  # time order as a rank: same order, no ties
    examples = build_examples(ordered, history_len)
    examples = examples.filter(pc.greater_equal(examples.column("seq"), 0))
    return examples.sort_by("seq").select(["user_id", "item_id", "history", "seq"])


def with_replay(examples: pa.Table, history: pa.Table, per_positive: float, history_len: int, seed: int) -> pa.Table:
    """``examples`` plus ``round(per_positive * N)`` examples of random ``history`` interactions,
    in a seeded random order.

    Args:
        examples: N new examples (``feedback_examples``).
        history: the interactions already in the model (``user_id, item_id, timestamp``).
        per_positive: replayed examples per new one (0: ``examples`` unchanged).
        seed: the draw and the order (a rerun of the same continuation draws the same).

    Returns:
        The same columns; replayed rows have ``seq`` -1.
    """
    n = min(round(per_positive * examples.num_rows), history.num_rows)
    if n == 0:
        return examples
    rng = np.random.default_rng(seed)
    replay = build_examples(history.select(["user_id", "item_id", "timestamp"]), history_len)
    replay = replay.take(pa.array(np.sort(rng.choice(replay.num_rows, size=n, replace=False))))
    replay = replay.select(["user_id", "item_id", "history"]).append_column("seq", pa.array(np.full(n, -1), pa.int64()))
    both = pa.concat_tables([examples.select(replay.column_names), replay.cast(examples.select(replay.column_names).schema)])
    return both.take(pa.array(rng.permutation(both.num_rows)))


def pad_for_workers(examples: pa.Table, world: int, batch_size: int) -> tuple[pa.Table, int, int]:
    """Pad ``examples`` so W workers take S equal full batches of b rows each.

    b = min(``batch_size``, ceil(N / W)), S = ceil(N / (W b)); the table grows to W S b rows with
    zero-weight copies of its last row (``seq`` -1).

    Returns:
        ``(table with a float32 ``weight`` column, b, S)``; ``(examples, 0, 0)`` for N = 0.
    """
    n = examples.num_rows
    weight = pa.array(np.ones(n, dtype=np.float32))
    if n == 0:
        return examples.append_column("weight", weight), 0, 0
    b = min(batch_size, math.ceil(n / world))
    steps = math.ceil(n / (world * b))
    pad = world * steps * b - n
    table = examples.append_column("weight", weight)
    if pad:
        filler = table.take(pa.array(np.full(pad, n - 1)))
        filler = filler.set_column(filler.schema.get_field_index("seq"), "seq", pa.array(np.full(pad, -1), pa.int64()))
        filler = filler.set_column(filler.schema.get_field_index("weight"), "weight", pa.array(np.zeros(pad, np.float32)))
        table = pa.concat_tables([table, filler])
    return table, b, steps
