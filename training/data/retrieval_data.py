"""What a retrieval job (two-tower, MFLI, HSNN) ships to its workers, built once on the driver.

Training examples: every train interaction with the user's previous ``history_len`` items
(``window`` None), or, for all-position training, each user's train items cut into windows of
``window`` targets (:func:`training.data.loader.build_sequence_examples`); either way
shuffled once with the run's seed so every epoch, and every replayed epoch after a restart,
sees the same order. Shared with every worker: the log-q table of the in-batch softmax, the
validation and test users (leave-one-out, seen items to mask) and train+valid for the export.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from training.data.eval_sets import make_eval_users, read_split
from training.data.loader import LogQ, build_examples, build_sequence_examples

logger = logging.getLogger("rayrec.train")


def retrieval_data(data_dir: Path, history_len: int, max_users: Optional[int], seed: int,
                   window: Optional[int] = None) -> tuple[pa.Table, dict[str, Any]]:
    """``(examples, shared)``: examples have ``user_id, item_id, history`` (``item_id`` and
    ``history`` lists of equal length when ``window`` is set); ``shared`` holds ``log_q``,
    ``valid_users``, ``test_users`` and ``train_valid``. Only the train split makes examples."""
    t0 = time.perf_counter()
    train = read_split(data_dir, "train")
    valid = read_split(data_dir, "valid")
    test = read_split(data_dir, "test")
    train_valid = pa.concat_tables([train, valid])
    interactions = train.select(["user_id", "item_id", "timestamp"])
    if window is None:
        examples = build_examples(interactions, history_len)
    else:
        examples = build_sequence_examples(interactions, window)
    order = np.random.default_rng(seed).permutation(examples.num_rows)
    examples = examples.take(pa.array(order)).select(["user_id", "item_id", "history"])
    shared = {
        "log_q": LogQ.from_interactions(train.column("item_id")),
        "valid_users": make_eval_users(train, valid, history_len, max_users, seed),
        "test_users": make_eval_users(train_valid, test, history_len, max_users, seed),
        "train_valid": train_valid.select(["user_id", "item_id", "timestamp"]),
    }
    logger.info("prepared %d training examples in %.1fs", examples.num_rows, time.perf_counter() - t0)
    return examples, shared
