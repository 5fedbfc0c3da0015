"""Checks of a dataset's leave-one-out split, shared by the ml-100k and synth tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from training.data.schema import SPLITS, DatasetPaths


def read_splits(paths: DatasetPaths, columns: list[str] | None = None) -> dict[str, pd.DataFrame]:
    return {s: pq.read_table(paths.interactions(s), columns=columns).to_pandas() for s in SPLITS}


def assert_leave_one_out(splits: dict[str, pd.DataFrame], all_users: bool) -> None:
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
