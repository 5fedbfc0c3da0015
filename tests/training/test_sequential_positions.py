"""All-position (SASRec) training of the sequential tower (``model.sequence.train_positions: all``):
the windows the examples are cut into, the per-slot user vectors (causal, aligned with their
targets, the last one the vector a retriever serves), and a loss over every real slot."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from training.config import SequenceConfig, TwoTowerModelConfig
from training.data.loader import build_sequence_examples
from training.models.sequential import build_sequential_tower
from training.models.two_tower import build_two_tower, in_batch_softmax_loss

E, D = 8, 6


def _interactions() -> pa.Table:
    """User 1: 8 items (t shuffled on purpose), user 2: 2 items, user 3: 1 item."""
    return pa.table({
        "user_id": [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3],
        "item_id": [17, 10, 11, 12, 13, 14, 15, 16, 21, 20, 30],
        "timestamp": [7, 0, 1, 2, 3, 4, 5, 6, 1, 0, 0],
    })


def test_windows_cover_every_target_once_cut_from_the_end():
    examples = build_sequence_examples(_interactions(), window=3).to_pydict()
    assert examples["user_id"] == [1, 1, 1, 2]  # user 3 has one item: no target
    assert examples["item_id"] == [[11], [12, 13, 14], [15, 16, 17], [21]]  # the newest window is full
    assert examples["history"] == [[10], [11, 12, 13], [14, 15, 16], [20]]
    for history, targets in zip(examples["history"], examples["item_id"]):
        assert len(history) == len(targets) <= 3
        assert history[1:] == targets[:-1]  # target j is the item after input j


@pytest.mark.parametrize("window", [1, 2, 5, 7, 50])
def test_every_item_but_a_users_first_is_a_target_exactly_once(window: int):
    rows = _interactions()
    examples = build_sequence_examples(rows, window)
    targets = sorted(t for ts in examples.column("item_id").to_pylist() for t in ts)
    assert targets == [11, 12, 13, 14, 15, 16, 17, 21]
    assert max(len(h) for h in examples.column("history").to_pylist()) <= window


def _tower(max_len: int = 6):
    torch.manual_seed(0)
    cfg = SequenceConfig(max_len=max_len, blocks=2, heads=2, dropout=0.0, use_user_id=True)
    return build_sequential_tower(cfg, embedding_dim=E, hidden=[16], out_dim=D).eval()


def _jagged(rows: list[torch.Tensor]) -> JaggedTensor:
    return JaggedTensor(values=torch.cat(rows), lengths=torch.tensor([r.shape[0] for r in rows], dtype=torch.int32))


def test_slot_t_ignores_later_items_and_the_last_slot_is_the_served_vector():
    tower = _tower()
    user, items = torch.randn(1, E), torch.randn(5, E)
    changed = items.clone()
    changed[3:] = torch.randn(2, E)
    a = tower.every_position(user, _jagged([items]))  # [5, D]
    b = tower.every_position(user, _jagged([changed]))
    assert a.shape == (5, D)
    torch.testing.assert_close(a[:3], b[:3])  # slots 0..2 never see items 3, 4
    assert not torch.allclose(a[3:], b[3:])
    # the state trained at the last slot is what forward() serves for the same history
    torch.testing.assert_close(a[-1:], tower(user, _jagged([items])))


def test_rows_of_a_batch_keep_their_own_slots_in_jagged_order():
    tower = _tower()
    users = torch.randn(3, E)
    rows = [torch.randn(2, E), torch.randn(6, E), torch.randn(1, E)]
    together = tower.every_position(users, _jagged(rows))
    alone = torch.cat([tower.every_position(users[i : i + 1], _jagged([r])) for i, r in enumerate(rows)])
    torch.testing.assert_close(together, alone)  # no padding or neighbour leaks, order = history.values()


def test_a_row_longer_than_max_len_is_refused():
    with pytest.raises(ValueError, match="max_len"):
        _tower(max_len=4).every_position(torch.randn(1, E), _jagged([torch.randn(5, E)]))


def _model():
    torch.manual_seed(0)
    cfg = TwoTowerModelConfig(dim=D, embedding_dim=E, hidden=[16], user_cardinality=64, item_cardinality=128,
                              user_tower="sequential", sequence={"max_len": 4, "blocks": 1, "heads": 2, "dropout": 0.0})
    return build_two_tower(cfg, torch.device("cpu"))


def _batch(windows: list[tuple[int, list[int], list[int]]]) -> KeyedJaggedTensor:
    """(user, history, targets) rows → the KJT ``to_kjt`` makes of ``build_sequence_examples`` rows."""
    values = [u for u, _, _ in windows] + [t for _, _, ts in windows for t in ts] + [h for _, hs, _ in windows for h in hs]
    lengths = [1] * len(windows) + [len(ts) for _, _, ts in windows] + [len(hs) for _, hs, _ in windows]
    return KeyedJaggedTensor(keys=["user_id", "item_id", "history"], values=torch.tensor(values),
                             lengths=torch.tensor(lengths, dtype=torch.int32))


def test_the_loss_counts_every_real_slot_once():
    model = _model()
    windows = [(1, [10, 11, 12, 13], [11, 12, 13, 14]), (2, [20], [21]), (3, [30, 31], [31, 32])]
    kjt = _batch(windows)
    user, item = model(kjt, every_position=True)
    assert user.shape == item.shape == (7, D)  # 4 + 1 + 2 slots, no padding slot
    ids = kjt["item_id"].values()
    loss = in_batch_softmax_loss(user, item, ids, None, 0.05)
    # the same loss as the mean over slots of each slot's own softmax against all 7 targets
    logits = user @ item.T / 0.05
    per_slot = []
    for i in range(7):
        row = logits[i].masked_fill((ids == ids[i]) & (torch.arange(7) != i), float("-inf"))
        per_slot.append(torch.logsumexp(row, 0) - row[i])
    torch.testing.assert_close(loss, torch.stack(per_slot).mean())
    # every slot's target row, the first slot's of each window included, gets a gradient
    loss.backward()
    grad = model.tables._embedding_module.embeddings["item"].weight.grad
    assert grad is not None and int((grad.abs().sum(1) > 0).sum()) >= len(set(ids.tolist()) | {10, 20, 30})


def test_user_slot_vectors_are_those_of_the_tower_alone():
    """The two-tower's every_position forward hands the tower the table rows in history order."""
    model = _model().eval()
    kjt = _batch([(1, [10, 11, 12], [11, 12, 13]), (2, [20, 21], [21, 22])])
    user, _ = model(kjt, every_position=True)
    # the last slot of each window equals the ordinary forward over that window (what eval serves)
    served, _ = model(KeyedJaggedTensor(keys=["user_id", "item_id", "history"], values=torch.tensor([1, 2, 10, 11, 12, 20, 21]),
                                        lengths=torch.tensor([1, 1, 0, 0, 3, 2], dtype=torch.int32)))
    torch.testing.assert_close(user[[2, 4]], served)


def test_positions_from_the_start_make_slot_t_the_state_served_after_item_t():
    torch.manual_seed(0)
    cfg = SequenceConfig(max_len=6, blocks=2, heads=2, dropout=0.0, positions="start")
    tower = build_sequential_tower(cfg, embedding_dim=E, hidden=[16], out_dim=D).eval()
    user, items = torch.randn(1, E), torch.randn(5, E)
    slots = tower.every_position(user, _jagged([items]))  # [5, D]
    prefixes = torch.cat([tower(user, _jagged([items[: t + 1]])) for t in range(5)])
    torch.testing.assert_close(slots, prefixes)  # trained at slot t == served for items 0..t
    # with recency positions only the last slot is (the others are trained with items still to come)
    recency = _tower()
    assert not torch.allclose(recency.every_position(user, _jagged([items]))[:-1],
                              torch.cat([recency(user, _jagged([items[: t + 1]])) for t in range(4)]))
