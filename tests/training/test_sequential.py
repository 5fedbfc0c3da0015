"""The sequential user tower (training/models/sequential.py) and the user-tower seam: shapes,
causality, padding, recency positions, and that ``model.user_tower`` picks it in every retriever."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor

from training.config import SequenceConfig, TwoTowerModelConfig
from training.models.sequential import SequentialUserTower, build_sequential_tower
from training.models.user_tower import MeanPoolUserTower, build_user_tower

E, D = 8, 6


def _tower(max_len: int = 6, use_user_id: bool = True) -> SequentialUserTower:
    torch.manual_seed(0)
    tower = build_sequential_tower(SequenceConfig(max_len=max_len, blocks=2, heads=2, dropout=0.0, use_user_id=use_user_id),
                                   embedding_dim=E, hidden=[16], out_dim=D)
    return tower.eval()


def _jagged(rows: list[torch.Tensor]) -> JaggedTensor:
    """Jagged history of B rows, each ``[n_b, E]``."""
    lengths = torch.tensor([r.shape[0] for r in rows], dtype=torch.int32)
    values = torch.cat(rows) if rows else torch.empty(0, E)
    return JaggedTensor(values=values, lengths=lengths)


def test_shapes_and_empty_history():
    tower = _tower()
    hist = [torch.randn(3, E), torch.randn(0, E), torch.randn(9, E)]  # the last is longer than max_len
    out = tower(torch.randn(3, E), _jagged(hist))
    assert out.shape == (3, D)
    assert torch.isfinite(out).all()  # an empty history reads a learned state, never NaN
    states, lengths = tower.sequence_states(_jagged(hist), 3)
    assert states.shape == (3, 6, E) and lengths.tolist() == [3, 0, 6]


def test_causal_a_slot_ignores_later_items():
    tower = _tower()
    items = torch.randn(5, E)
    changed = items.clone()
    changed[3:] = torch.randn(2, E)  # change items after slot 2
    a, _ = tower.sequence_states(_jagged([items]), 1)
    b, _ = tower.sequence_states(_jagged([changed]), 1)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_padding_and_batch_neighbours_do_not_leak():
    tower = _tower(use_user_id=False)
    mine = torch.randn(2, E)
    alone = tower(torch.zeros(1, E), _jagged([mine]))
    # the same row beside a longer one: padded to 6 slots instead of 2
    beside = tower(torch.zeros(2, E), _jagged([mine, torch.randn(6, E)]))[:1]
    torch.testing.assert_close(alone, beside)


def test_order_matters_and_only_the_last_max_len_items_count():
    tower = _tower(max_len=4, use_user_id=False)
    items = torch.randn(4, E)
    forward = tower(torch.zeros(1, E), _jagged([items]))
    backward = tower(torch.zeros(1, E), _jagged([items.flip(0)]))
    assert not torch.allclose(forward, backward)  # unlike a mean, the tower reads order
    longer = tower(torch.zeros(1, E), _jagged([torch.cat([torch.randn(3, E), items])]))
    torch.testing.assert_close(forward, longer)  # items older than the 4 most recent are cut


def test_heads_must_divide_the_table_dim():
    with pytest.raises(ValueError, match="heads"):
        build_sequential_tower(SequenceConfig(heads=3), embedding_dim=E, hidden=[], out_dim=D)


def test_config_selects_the_tower_for_every_retriever():
    from training.models.hsnn import HSNNModelConfig, build_hsnn
    from training.models.mfli import MFLIModelConfig, build_mfli
    from training.models.two_tower import build_two_tower

    small = {"dim": 8, "embedding_dim": 8, "hidden": [16], "user_cardinality": 16, "item_cardinality": 16}
    assert isinstance(build_user_tower(TwoTowerModelConfig(**small), out_dim=8), MeanPoolUserTower)
    seq = {**small, "user_tower": "sequential", "sequence": {"max_len": 7, "blocks": 1}}
    meta = torch.device("meta")
    two_tower = build_two_tower(TwoTowerModelConfig(**seq), meta)
    assert isinstance(two_tower.user_mlp, SequentialUserTower) and two_tower.user_mlp.max_len == 7
    assert isinstance(build_mfli(MFLIModelConfig(**seq, codes=4, levels=1), meta).user_mlp, SequentialUserTower)
    assert isinstance(build_hsnn(HSNNModelConfig(**seq, codes=4), meta, history_len=7).towers["user"], SequentialUserTower)


def test_mean_tower_keeps_the_old_parameter_names():
    tower = build_user_tower(TwoTowerModelConfig(embedding_dim=8, hidden=[16]), out_dim=4)
    assert sorted(tower.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_histories_are_time_ordered_whatever_the_row_order():
    """What the tower reads as order: ``build_examples`` / ``user_histories`` sort each user's rows
    by (timestamp, item_id) whatever order they arrive in, oldest first (ties by item_id, as the split)."""
    import pyarrow as pa

    from training.data.loader import build_examples, user_histories

    rows = pa.table({"user_id": [1, 1, 1, 1, 2], "item_id": [30, 10, 20, 5, 7], "timestamp": [9, 3, 9, 1, 4]})
    examples = build_examples(rows, history_len=10).to_pydict()
    by_item = dict(zip(examples["item_id"], examples["history"]))
    assert by_item[30] == [5, 10, 20]  # 20 and 30 share t=9: 20 first
    assert by_item[20] == [5, 10]
    assert user_histories(rows, history_len=3).to_pydict()["history"] == [[10, 20, 30], [7]]


def test_the_sequential_config_loads_and_selects_the_tower():
    from pathlib import Path

    from training.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "ml100k-seq.yaml")
    assert cfg.model.user_tower == "sequential" and cfg.model.sequence.max_len <= cfg.data.history_len
    assert load_config(Path(__file__).resolve().parents[2] / "configs" / "ml100k.yaml").model.user_tower == "mean"
