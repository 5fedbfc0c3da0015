"""The ranker: examples, the missing-FM path, FM dropout at any hit rate, the 2-worker job and its artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import set_mpzch_training
from tests.conftest import REPO
from training.config import load_config
from training.data.ranking_examples import RankingDataSpec, build_ranking_data
from training.models.foundation import FoundationArchSpec, FoundationModel, newest_first_window
from training.models.ranker import RankerArch, build_ranking_model
from training.models.ranker_artifact import load_ranker
from training.models.ranker_config import FoundationConfig, MBDConfig, RankerModelConfig, TaskConfig
from training.models.ranker_loss import fm_keep_mask, imputation_loss, ranking_loss
from training.models.ranker_scoring import score_table


# ---------------------------------------------------------------- configs and examples
@pytest.mark.parametrize("name", ["tiny-ranker.yaml", "ml100k-ranker.yaml", "synth-ranker.yaml"])
def test_ranker_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.kind == "ranker" and cfg.model.tasks and cfg.model.mbd.signals
    assert set(cfg.model.mbd.signals) <= {t.name for t in cfg.model.tasks}


def test_movielens_examples_have_labels_masks_and_whole_lists(ml100k_dir):
    spec = RankingDataSpec("movielens", history_len=5, negatives=1, eval_negatives=4, max_train_rows=2000, max_eval_groups=30)
    data = build_ranking_data(ml100k_dir, spec, ["like", "rated", "rating"], seed=0)
    labels = np.stack(data.train.column("labels").to_numpy(zero_copy_only=False))
    masks = np.stack(data.train.column("masks").to_numpy(zero_copy_only=False))
    rated = labels[:, 1] == 1
    assert rated.sum() == 2000 and (~rated).sum() == 2000  # one sampled unrated item per rating
    assert ((labels[:, 0] == 1) == (rated & (labels[:, 2] >= 4))).all()  # like = rating >= 4
    assert (masks[~rated, 2] == 0).all() and (masks[rated, 2] == 1).all()  # no rating to regress
    test = data.test
    groups = test.column("group").to_numpy()
    assert (np.diff(groups) >= 0).all() and len(np.unique(groups)) == 30  # lists are contiguous
    positives = test.column("relevance").to_numpy() > 0
    assert positives.sum() == 30 and test.num_rows == 30 * 5
    assert set(data.features.cohort_sizes) == {"activity", "genre", "decade"}


# ---------------------------------------------------------------- the missing-FM path
def _tiny_model(fm: bool = True):
    cfg = RankerModelConfig(
        tasks=[TaskConfig(name="like"), TaskConfig(name="rating", loss="huber")],
        embedding_dim=8, cohort_dim=2, hidden=[16], user_cardinality=64, item_cardinality=64,
        mbd=MBDConfig(signals={"like": "gaussian"}, cohort=["c"], hidden=[4]),
        foundation=FoundationConfig(enabled=fm, dim=8, layers=1, heads=2),
    )  # fmt: skip
    torch.manual_seed(0)
    return cfg, build_ranking_model(cfg, ["a", "b"], {"c": 3, "d": 2}, history_len=4, device=torch.device("cpu"))


def _batch():
    """4 pairs: users 7,7,9,11; items 1..4; histories of 2, 0, 3, 1 ids."""
    kjt = KeyedJaggedTensor(
        keys=["user_id", "item_id", "history"],
        values=torch.tensor([7, 7, 9, 11, 1, 2, 3, 4, 5, 6, 1, 2, 3, 9]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 2, 0, 3, 1], dtype=torch.int32),
    )
    dense = torch.tensor([[0.1, 1.0], [0.2, -1.0], [0.3, 0.5], [0.4, 0.0]])
    cohorts = torch.tensor([[0, 1], [1, 0], [2, 1], [0, 0]])
    labels = torch.tensor([[1.0, 4.0], [0.0, 2.0], [1.0, 5.0], [0.0, 1.0]])
    return kjt, dense, cohorts, labels


def test_fm_reads_the_newest_items_newest_first():
    """Token 1 is each row's latest item whatever the history's length, and only the newest L
    items count: a row and the same row with older items prepended beyond L embed alike."""
    idx, lengths = newest_first_window(torch.tensor([0, 5, 7, 7]), 3)
    assert idx.tolist() == [4, 3, 2, 6, 5] and lengths.tolist() == [3, 2, 0]
    torch.manual_seed(0)
    fm = FoundationModel(FoundationArchSpec(table_dim=4, dense_dim=2, history_len=3, num_tasks=1, dim=8, layers=1, heads=2)).eval()
    rows = torch.randn(6, 4)
    candidate, dense = torch.randn(2, 4), torch.randn(2, 2)
    # row 0: items 0..5 (6 items, L=3 keeps 3..5); row 1: items 3..5 only
    history = torch.cat([rows, rows[3:]])
    emb, _ = fm(history, torch.tensor([0, 6, 9]), candidate[[0, 0]], dense[[0, 0]])
    torch.testing.assert_close(emb[0], emb[1])
    # the order matters: the same items, newest last swapped, embed differently
    swapped = torch.cat([rows[3:], rows[[5, 4, 3]]])
    emb2, _ = fm(swapped, torch.tensor([0, 3, 6]), candidate[[0, 0]], dense[[0, 0]])
    assert not torch.allclose(emb2[0], emb2[1], atol=1e-4)


def test_missing_fm_uses_the_learned_embedding_and_differs_from_fm_present():
    _, model = _tiny_model()
    kjt, dense, cohorts, _ = _batch()
    model(kjt, dense, cohorts)  # training mode: MPZCH inserts the ids
    model.eval()
    set_mpzch_training(model, False)
    with torch.no_grad():
        absent = model(kjt, dense, cohorts)  # no FM at all
        dropped = model(kjt, dense, cohorts, fm_keep=torch.zeros(4, dtype=torch.bool))  # FM ran, all missing
        present = model(kjt, dense, cohorts, fm_keep=torch.ones(4, dtype=torch.bool))
        # serving path: the same FM embeddings, precomputed and passed in
        rows, _ = model.tables(kjt)
        offsets = torch.tensor([0, 2, 2, 5, 6])
        fm = model.foundation(rows["history"].values(), offsets, rows["item_id"].values(), dense)[0]
        precomputed = model(kjt, dense, cohorts, fm_keep=torch.ones(4, dtype=torch.bool), fm=fm)
        half = model(kjt, dense, cohorts, fm_keep=torch.tensor([True, False, True, False]), fm=fm)
    assert not absent.fm_present.any() and present.fm_present.all()
    for task in ("like", "rating"):
        torch.testing.assert_close(absent.predictions[task], dropped.predictions[task])
        torch.testing.assert_close(present.predictions[task], precomputed.predictions[task])
        assert not torch.allclose(absent.predictions[task], present.predictions[task])
        # per row: a row with FM matches the all-present pass, a row without matches absent
        torch.testing.assert_close(half.predictions[task][[0, 2]], present.predictions[task][[0, 2]])
        torch.testing.assert_close(half.predictions[task][[1, 3]], absent.predictions[task][[1, 3]])
    assert set(absent.mbd_mean) == {"like"} and (absent.mbd_var["like"] > 0).all()


@pytest.mark.parametrize("embeddings", ["own", "shared"])
def test_mbd_loss_never_reaches_the_trunk_and_own_embeddings_fit_the_cohort_means(embeddings):
    """MBD reads its own cohort tables by default; either way its loss leaves the ranker's cohort
    embeddings, ids and arch untouched, and with its own tables it fits planted cell means."""
    cfg = RankerModelConfig(
        tasks=[TaskConfig(name="like"), TaskConfig(name="rating", loss="huber")],
        embedding_dim=8, cohort_dim=4, hidden=[16], user_cardinality=64, item_cardinality=64,
        mbd=MBDConfig(signals={"rating": "gaussian"}, cohort=["c", "d"], hidden=[16], embeddings=embeddings),
        foundation=FoundationConfig(enabled=False),
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_ranking_model(cfg, ["a", "b"], {"c": 5, "d": 3}, history_len=4, device=torch.device("cpu"))
    assert (model.mbd_cohorts is not None) == (embeddings == "own")
    kjt, dense, _, _ = _batch()
    cells = torch.cartesian_prod(torch.arange(5), torch.arange(3))  # [15, 2]: every (c, d) cell
    means = 1.0 + 0.5 * cells[:, 0] - 1.5 * cells[:, 1] + (cells[:, 0] * cells[:, 1] == 4)  # not additive
    optimizer = torch.optim.Adam([p for n, p in model.named_parameters() if n.startswith("mbd")], lr=0.03)
    g = torch.Generator().manual_seed(0)
    for step in range(1000):
        pick = torch.randint(0, 15, (4,), generator=g)
        cohorts = cells[pick]
        labels = torch.stack([torch.zeros(4), means[pick] + 0.3 * torch.randn(4, generator=g)], 1)
        out = model(kjt, dense, cohorts)
        model.zero_grad(set_to_none=True)
        ranking_loss(model, out, labels, torch.ones(4, 2), cfg)["mbd"].backward()
        if step == 0:
            assert all(p.grad is None for p in model.cohorts.parameters())
            assert all(p.grad is None for p in model.arch.parameters())
            assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.tables.parameters())
            assert all(p.grad is not None for p in model.mbd.parameters())
        optimizer.step()
    if embeddings == "own":
        with torch.no_grad():
            fitted = model.mbd(model.mbd_cohorts(cells).flatten(1))["rating"][0]
        assert float((fitted - means).abs().mean()) < 0.2, (fitted, means)  # cell means span 5.5
        assert float(torch.corrcoef(torch.stack([fitted, means.float()]))[0, 1]) > 0.99


def test_mmoe_arch_fits_two_unrelated_tasks_with_task_specific_gates():
    """arch: mmoe builds X experts and one gate per task; on two tasks that read disjoint inputs
    both fit, and the two gates learn different mixtures of the experts."""
    cfg = RankerModelConfig(
        tasks=[TaskConfig(name="a"), TaskConfig(name="b")], arch="mmoe", experts=4,
        embedding_dim=8, cohort_dim=2, hidden=[16], user_cardinality=64, item_cardinality=64,
        foundation=FoundationConfig(enabled=False),
    )  # fmt: skip
    model = build_ranking_model(cfg, ["a", "b"], {"c": 3}, history_len=4, device=torch.device("cpu"))
    assert model.arch.bottom is None and len(model.arch.mmoe.experts) == 4 and len(model.arch.mmoe.gates) == 2

    torch.manual_seed(0)
    arch = RankerArch(8, 0, 2, [16], experts=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 8, generator=g)
    y = torch.stack([(x[:, 0] * x[:, 1] > 0).float(), (x[:, 4] + x[:, 5] ** 2 > 1).float()], 1)  # [N, 2]
    optimizer = torch.optim.Adam(arch.parameters(), lr=0.01)
    absent = torch.zeros(256, dtype=torch.bool)
    for _ in range(600):
        rows = torch.randint(0, len(x), (256,), generator=g)
        loss = F.binary_cross_entropy_with_logits(arch(x[rows], None, absent)[0], y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = ((arch(x, None, torch.zeros(len(x), dtype=torch.bool))[0] > 0).float() == y).float().mean(0)
        gates = [F.softmax(gate(x), -1).mean(0) for gate in arch.mmoe.gates]  # [X] each
    assert (accuracy > 0.95).all(), accuracy  # measured 0.99 both
    assert float((gates[0] - gates[1]).abs().sum()) > 0.25, gates  # measured 0.58


def test_missing_embedding_learns_only_from_rows_without_fm_and_ranker_loss_stops_at_the_fm():
    cfg, model = _tiny_model()
    kjt, dense, cohorts, labels = _batch()
    masks = torch.ones_like(labels)
    for keep, missing_grad in ((torch.ones(4, dtype=torch.bool), False), (torch.zeros(4, dtype=torch.bool), True)):
        model.zero_grad()
        out = model(kjt, dense, cohorts, fm_keep=keep)
        out.fm_logits = None  # the ranker's own loss only
        ranking_loss(model, out, labels, masks, cfg)["total"].backward()
        grad = model.arch.missing_fm.grad
        assert (grad is not None and float(grad.abs().sum()) > 0) == missing_grad
        assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.foundation.parameters())


def _fm_world(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features x ``[n, 4]``, an FM embedding ``[n, 8]`` and labels: the FM carries most signal."""
    g = torch.Generator().manual_seed(seed)
    x, fm = torch.randn(n, 4, generator=g), torch.randn(n, 8, generator=g)
    y = (torch.rand(n, generator=g) < torch.sigmoid(1.0 * x[:, 0] + 2.5 * fm[:, 0])).float()
    return x, fm, y


def _train_arch(dropout) -> RankerArch:
    torch.manual_seed(0)
    arch = RankerArch(in_dim=4, fm_dim=8, tasks=1, hidden=[16])
    x, fm, y = _fm_world(4000, seed=1)
    opt = torch.optim.Adam(arch.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        keep = fm_keep_mask(len(y), dropout, g)
        loss = F.binary_cross_entropy_with_logits(arch(x, fm, keep)[0][:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return arch


def _imputable_world(n: int, seed: int):
    """The FM embedding is a function of the ranker's features (as on real data, where both read
    the user's history and the item), and the label reads the FM."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    fm = torch.tanh(1.5 * x @ torch.randn(4, 8, generator=torch.Generator().manual_seed(99)))
    y = (torch.rand(n, generator=g) < torch.sigmoid(3 * fm[:, 0] * fm[:, 1] + 2 * fm[:, 2])).float()
    return x, fm, y


def test_the_imputer_learns_the_fm_and_lifts_the_missing_path():
    x, fm, y = _imputable_world(4000, seed=1)
    x_test, fm_test, y_test = _imputable_world(6000, seed=3)
    auc = {}
    for impute in (False, True):
        torch.manual_seed(0)
        arch = RankerArch(in_dim=4, fm_dim=8, tasks=1, hidden=[8], impute=impute)
        opt = torch.optim.Adam(arch.parameters(), lr=0.02)
        g = torch.Generator().manual_seed(2)
        for _ in range(150):
            logits, imputed = arch(x, fm, fm_keep_mask(len(y), "uniform", g))
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y)
            if impute:
                loss = loss + imputation_loss(imputed, fm)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits, imputed = arch(x_test, fm_test, torch.zeros(len(y_test), dtype=torch.bool))  # every FM missing
        auc[impute] = float(binary_auroc(torch.sigmoid(logits[:, 0]), y_test.long()))
        if impute:
            assert float(imputation_loss(imputed, fm_test)) < 0.3  # R² > 0.7 on held-out rows
        else:
            assert imputed is None
    assert auc[True] > auc[False] + 0.005


def test_fm_dropout_training_works_at_any_hit_rate():
    x, fm, y = _fm_world(6000, seed=3)
    g = torch.Generator().manual_seed(4)
    rates = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
    with_dropout, always_fm = _train_arch("uniform"), _train_arch(0.0)
    auc, bce = {}, {}
    with torch.no_grad():
        for name, arch in (("dropout", with_dropout), ("always", always_fm)):
            for r in rates:
                logits = arch(x, fm, torch.rand(len(y), generator=g) < r)[0][:, 0]
                auc[name, r] = float(binary_auroc(torch.sigmoid(logits), y.long()))
                bce[name, r] = float(F.binary_cross_entropy_with_logits(logits, y))
    drop = [auc["dropout", r] for r in rates]
    assert drop[0] > 0.6  # without FM the features still rank
    assert drop[-1] > drop[0] + 0.1  # the FM carries most of the signal
    assert all(b >= a - 0.005 for a, b in zip(drop, drop[1:]))  # more hits never hurt
    assert (auc["dropout", 0.9] - drop[0]) >= 0.8 * (drop[-1] - drop[0])
    # a ranker never trained without the FM is miscalibrated when the FM is missing
    assert bce["always", 0.0] > bce["dropout", 0.0] + 0.02


# ---------------------------------------------------------------- the job: 2 workers, artifact
@pytest.fixture(scope="module")
def tiny_ranker_run(ray_session, ml100k_dir, tmp_path_factory):
    from training.jobs.train_ranker import run

    runs = tmp_path_factory.mktemp("ranker-runs")
    cfg = load_config(REPO / "configs" / "tiny-ranker.yaml", [f"data.path={ml100k_dir}", f"runs_dir={runs}"])
    return cfg, run(cfg, run_id="tiny-ranker")


def test_job_trains_on_two_workers_and_reports(tiny_ranker_run):
    _, run = tiny_ranker_run
    records = list(run.read_metrics())
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["loss"] < records[0]["loss"]
    assert {"loss/tasks", "loss/mbd", "loss/fm", "loss/fm_impute"} <= set(records[0])  # tiny-ranker imputes
    assert records[1]["loss/fm_impute"] < records[0]["loss/fm_impute"]
    assert json.loads(run.meta_path.read_text())["world_size"] == 2
    assert sorted(p.name for p in run.checkpoints()[-1].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    test = json.loads(run.eval_path.read_text())
    for key in ("test/fm0/like/auc", "test/fm1/like/auc", "test/fm0/rated/ne", "test/fm0/value_pct/ndcg@10"):
        assert 0 < test[key] < 10, key


def test_serving_stage_ranks_a_batch_of_users_as_it_ranks_each_alone(tiny_ranker_run):
    """The checkpoint loads in serving, and the stage's one forward pass per request batch
    (several users, an empty request, an unknown user; FM off and synchronous) ranks each
    request as a batch of one would."""
    from serving.ranker import RankingStage, RankQuery
    from serving.ranking_models import load_run_models

    _, run = tiny_ranker_run
    stage = RankingStage(load_run_models(str(run.path)))
    queries = [RankQuery(1, [1, 50, 181, 7, 3], 3), RankQuery(7, [], 2), RankQuery(10**12, [50, 3, 9], 5)]
    for sync_fm in (False, True):
        fm, present = stage.compute_fm(queries) if sync_fm else (None, None)
        together = stage.rank(queries, fm, present)
        for q, (ids, scores) in zip(queries, together):
            fm_q, present_q = stage.compute_fm([q]) if sync_fm else (None, None)
            (alone_ids, alone_scores), = stage.rank([q], fm_q, present_q)
            assert ids == alone_ids and len(ids) == min(q.k, len(q.candidates))
            np.testing.assert_allclose(scores, alone_scores, rtol=1e-5, atol=1e-6)


def test_exported_ranker_loads_unsharded_and_reproduces_the_job_metrics(tiny_ranker_run, ml100k_dir):
    """The unsharded export scores the test lists exactly as rank 0 did inside the job.

    This also pins DDP's gradient sync of the dense part: if the ranks' dense weights drifted
    apart, the saved weights would not be the ones rank 0 evaluated with.
    """
    from training.jobs.train_ranker import task_metrics

    cfg, run = tiny_ranker_run
    scorer = load_ranker(run.path / "ranker")
    candidates = np.array([1, 50, 181, 10**12])  # a never-seen id still gets a score
    out = scorer.score(1, candidates)
    assert set(out.predictions) == {"like", "rated", "rating"} and out.predictions["like"].shape == (4,)
    assert set(out.mbd_mean) == {"like", "rating"} and (out.mbd_var["rating"] > 0).all()
    fm = scorer.fm_embeddings(1, candidates)
    assert fm.shape == (4, cfg.model.foundation.dim)
    assert not torch.allclose(scorer.score(1, candidates, fm=fm).predictions["like"], out.predictions["like"])
    # pairs of several users in one pass (the serving batch) == one pass per user
    users = np.array([1, 1, 1, 1, 7, 7, 10**12])
    items = np.concatenate([candidates, [50, 3, 181]])
    together, fm_together = scorer.score(users, items), scorer.fm_embeddings(users, items)
    alone = [scorer.score(1, candidates), scorer.score(7, items[4:6]), scorer.score(10**12, items[6:])]
    for task in ("like", "rated", "rating"):
        torch.testing.assert_close(together.predictions[task], torch.cat([a.predictions[task] for a in alone]))
    torch.testing.assert_close(together.mbd_mean["rating"], torch.cat([a.mbd_mean["rating"] for a in alone]))
    torch.testing.assert_close(fm_together, torch.cat([fm, scorer.fm_embeddings(7, items[4:6]), scorer.fm_embeddings(10**12, items[6:])]))
    assert not torch.allclose(together.raw_predictions["like"][4:6], scorer.score(1, items[4:6]).raw_predictions["like"])  # the user matters

    data = build_ranking_data(ml100k_dir, cfg.data.spec(), [t.name for t in cfg.model.tasks], cfg.seed)
    shape = (len(data.features.dense_names), len(data.features.cohort_sizes), len(data.tasks))
    test = json.loads(run.eval_path.read_text())
    for rate in (0.0, 1.0):
        metrics = task_metrics(score_table(scorer.model, data.test, shape, 512, rate, cfg.seed), data.test, data.tasks)
        for key in ("like/auc", "rated/auc", "rated/ne", "rating/rmse"):
            assert metrics[key] == pytest.approx(test[f"test/fm{rate:g}/{key}"], abs=1e-5), (rate, key)
