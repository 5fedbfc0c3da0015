"""Early stopping on valid (``train.patience``, training/early_stop.py): when it stops, and that the
best epoch's weights, sharded MPZCH tables included, come back on every rank after later epochs
changed them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from training.config import ConfigError, load_config
from training.early_stop import BestEpoch


def _run(patience, recalls: list[float]) -> tuple[BestEpoch, int]:
    best = BestEpoch(patience)
    for epoch, value in enumerate(recalls):
        best.update(epoch, {"valid/recall@10": value})
        if best.should_stop:
            return best, epoch
    return best, len(recalls) - 1


def test_stops_after_patience_epochs_without_a_better_valid_recall():
    best, stopped = _run(2, [0.10, 0.20, 0.15, 0.19, 0.30])
    assert (stopped, best.best_epoch, best.best_value) == (3, 1, 0.20)  # epoch 4's 0.30 is never trained


def test_a_tie_is_no_improvement_and_the_earlier_epoch_stays_best():
    best, stopped = _run(1, [0.10, 0.20, 0.20, 0.25])
    assert (stopped, best.best_epoch) == (2, 1)


def test_without_patience_every_epoch_runs_and_nothing_is_kept():
    best, stopped = _run(None, [0.3, 0.2, 0.1, 0.0])
    assert stopped == 3 and best.best_epoch == 0 and not best.should_stop
    assert best.restore(torch.nn.Linear(1, 1)) is None  # nothing was kept: the last epoch is served


def test_patience_and_all_positions_are_refused_where_no_job_reads_them():
    for config in ("ml100k-mfli.yaml", "ml100k-hsnn.yaml"):
        with pytest.raises(ConfigError, match="two-tower only"):
            load_config(REPO / "configs" / config, ["train.patience=2"])
        with pytest.raises(ConfigError, match="two-tower only"):
            load_config(REPO / "configs" / config, ["model.user_tower=sequential", "model.sequence.train_positions=all"])
    assert load_config(REPO / "configs" / "ml100k-seq.yaml", ["train.patience=2"]).train.patience == 2


def _keep_restore_worker(rank: int, store: str, out: str) -> None:
    """One of 2 gloo ranks: a row-wise sharded two-tower keeps its weights, trains 3 steps (the
    tables' fused optimizer and AdamW change them), restores, and saves item + user vectors."""
    import pyarrow as pa

    from embeddings.sharding import combined_optimizer, shard_model
    from embeddings.tables import set_mpzch_training
    from tests.process_group import join_group, leave_group
    from training.config import TwoTowerModelConfig
    from training.data.loader import to_kjt
    from training.eval.distributed import embed_rows
    from training.jobs.step_timing import StepTimes
    from training.jobs.train_retrieval import train_step
    from training.models.two_tower import build_two_tower, table_specs

    join_group(rank, 2, store)
    torch.manual_seed(0)
    cfg = TwoTowerModelConfig(dim=8, embedding_dim=8, hidden=[16], user_cardinality=64, item_cardinality=128,
                              user_tower="sequential", sequence={"max_len": 4, "blocks": 1, "heads": 2})
    model = shard_model(build_two_tower(cfg, torch.device("meta")), table_specs(cfg), torch.device("cpu"), "rowwise_adagrad", 0.5)
    optimizer = combined_optimizer(model, lr=0.05)
    batch = pa.table({"user_id": [1, 2, 3, 4], "item_id": [[11, 12], [21], [31, 32, 33], [41]],
                      "history": [[10, 11], [20], [30, 31, 32], [40]]})

    def step() -> None:
        model.train()
        set_mpzch_training(model, True)
        train_step(model, optimizer, to_kjt(batch), None, 0.1, StepTimes(), every_position=True)

    def vectors() -> torch.Tensor:
        model.eval()
        set_mpzch_training(model, False)
        items = embed_rows(model, pa.table({"item_id": list(range(10, 45))}), ["item_id"], 8, tower="item")
        users = embed_rows(model, batch.select(["user_id", "history"]), ["user_id", "history"], 8, tower="user")
        return torch.cat([items, users])

    best = BestEpoch(patience=1)
    step()
    best.update(0, {"valid/recall@10": 0.5})
    best.keep(model)
    kept = vectors()
    for _ in range(3):
        step()
    changed = vectors()
    restored_epoch = best.restore(model)
    if rank == 0:
        torch.save({"kept": kept, "changed": changed, "restored": vectors(), "epoch": restored_epoch}, out)
    else:
        vectors()  # the embedding passes are collective
    leave_group()


def test_restore_brings_back_the_kept_weights_on_every_rank(tmp_path):
    out = tmp_path / "vectors.pt"
    code = ("import sys; sys.path.insert(0, %r); from tests.training.test_patience import _keep_restore_worker; "
            "_keep_restore_worker(int(sys.argv[1]), %r, %r)") % (str(REPO), str(tmp_path / "pg-store"), str(out))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rank)], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errors)
    result = torch.load(out)
    assert result["epoch"] == 0
    assert not torch.allclose(result["kept"], result["changed"], atol=1e-4)  # training moved them
    torch.testing.assert_close(result["restored"], result["kept"])
