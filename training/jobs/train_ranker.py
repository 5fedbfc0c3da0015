"""Train the multi-task ranker, its MBD branch and the foundation model with Ray Train: the recipe.

Driver (``run``): validate config → run folder → ranking examples, evaluation lists and
feature tables (:mod:`training.data.ranking_examples`) → Ray Data → ``TorchTrainer``.

Each worker (``train_loop_per_worker``), top to bottom:

1. device and seed
2. model: MPZCH tables on "meta" + cohort embeddings, ranker arch, MBD, FM → DMP (tables
   row-wise across workers, :func:`embeddings.sharding.shard_model`)
3. optimizer: fused row-wise Adagrad for the rows, AdamW for the rest
4. restore the latest checkpoint, if any
5. per epoch: train on this worker's shard (FM dropout per row), evaluate on the validation
   lists (every rank scores the same rows, so DMP's collectives line up; rank 0 computes the
   metrics), save a sharded DCP checkpoint and report
6. at the end: test metrics at FM hit rates 0 / 1 (``eval.json``) and the serving artifact
   ``ranker/`` (:func:`training.models.ranker_artifact.export_ranker`)

FM and ranker train **jointly**, in one pass: on 2 shared cores a second pass over the data for
an FM-first stage would double the cost; the FM learns only from its own heads and the ranker
reads its embedding detached, so the FM is the same model it would be if trained alone. The
price: early in training the ranker sees a moving FM feature; FM dropout (``uniform``: every
hit rate from 0 to 1) keeps the ranker from leaning on it, and the learned missing embedding
is trained on every batch.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from training.config import FailureConfig, ScalingConfig, TrainLoopConfig
from training.data.ranking_examples import RankingDataSpec, Source, label_arrays
from training.jobs.launch import fit_on_ray, job_paths, start_worker, worker_run
from training.progress import StepProgress
from training.models.ranker_config import RankerModelConfig
from training.models.value import ValueConfig, ValueModel
from training import storage
from training.runs import RunDir, create_run, new_run_id

logger = logging.getLogger("rayrec.train")


# ---------------------------------------------------------------- config
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RankerDataConfig(_Section):
    """Dataset folder and how ranking examples are cut (:class:`RankingDataSpec`)."""

    path: str = "data/ml-100k"
    source: Source = "movielens"
    history_len: int = Field(50, gt=0, le=10_000)
    negatives: int = Field(2, ge=0)
    eval_negatives: int = Field(20, ge=0)
    holdout_share: float = Field(0.1, gt=0, lt=1)
    max_train_rows: int | None = Field(None, gt=0)
    max_eval_groups: int | None = Field(None, gt=0)
    length_buckets: int = Field(20, ge=2, le=1000)
    noise_buckets: int = Field(0, ge=0, le=1000)

    def spec(self) -> RankingDataSpec:
        return RankingDataSpec(**self.model_dump(exclude={"path"}))


class RankerEvalConfig(_Section):
    """Evaluation: scoring batch size, the hit rates reported at the end, NDCG cut-off, and
    whether the binary tasks get per-path calibration (:mod:`training.models.calibration`)."""

    batch_size: int = Field(1024, gt=0)
    fm_hit_rates: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    k: int = Field(10, gt=0)
    calibrate: bool = True  # fit per-path Platt maps on the validation lists after training


class RankerRunConfig(_Section):
    """``kind: ranker``: the MTML ranker with MBD, the value model and the FM (this file)."""

    kind: Literal["ranker"] = "ranker"
    seed: int = 42
    run_id: str | None = None
    runs_dir: str = "runs"
    data: RankerDataConfig = Field(default_factory=RankerDataConfig)
    model: RankerModelConfig
    value: ValueConfig = Field(default_factory=ValueConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    eval: RankerEvalConfig = Field(default_factory=RankerEvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)


CONFIG = RankerRunConfig


# ---------------------------------------------------------------- evaluation
def _groups(table: pa.Table) -> list[np.ndarray]:
    """Row indices of each evaluation list (rows are sorted by group)."""
    g = table.column("group").to_numpy()
    cuts = np.flatnonzero(np.diff(g)) + 1
    return np.split(np.arange(len(g)), cuts)


def task_metrics(scores: dict[str, np.ndarray], table: pa.Table, tasks: dict[str, str]) -> dict[str, float]:
    """Per task: AUC (torchmetrics), NE and calibration (torchrec's formulas) or RMSE."""
    from torchmetrics.functional.classification import binary_auroc
    from torchrec.metrics.ne import compute_cross_entropy, compute_ne

    labels, masks = label_arrays(table, len(tasks))  # [N, T] each
    out: dict[str, float] = {}
    for t, (name, kind) in enumerate(tasks.items()):
        keep = masks[:, t] > 0
        pred = torch.from_numpy(scores[f"pred/{name}"][keep]).double()
        y = torch.from_numpy(labels[keep, t]).double()
        if kind == "binary":
            p = pred.clamp(1e-7, 1 - 1e-7)
            w = torch.ones_like(y)
            ce = compute_cross_entropy(y, p, w, eta=1e-12).sum()
            out[f"{name}/auc"] = float(binary_auroc(p, y.long()))
            out[f"{name}/ne"] = float(compute_ne(ce, w.sum(), (y * w).sum(), ((1 - y) * w).sum(), eta=1e-12))
            out[f"{name}/calibration"] = float(p.sum() / y.sum().clamp(min=1e-12))
        else:
            out[f"{name}/rmse"] = float(((pred - y) ** 2).mean().sqrt())
            out[f"{name}/calibration"] = float(pred.sum() / y.sum().clamp(min=1e-12))
    return out


def value_metrics(value: torch.Tensor, table: pa.Table, k: int) -> dict[str, float]:
    """NDCG@k of the value ordering per list (relevance column), Kendall τ with ``true_pref``
    per list, and the pooled Pearson correlation of the value with log(bias) (synthetic data)."""
    from torchmetrics.functional import kendall_rank_corrcoef, retrieval_normalized_dcg

    relevance = torch.from_numpy(table.column("relevance").to_numpy().astype(np.float32))
    truth = torch.from_numpy(table.column("true_pref").to_numpy().astype(np.float32))
    bias = table.column("bias").to_numpy().astype(np.float64)
    ndcg, tau = [], []
    for rows in _groups(table):
        if len(rows) < 2:
            continue
        idx = torch.from_numpy(rows)
        if float(relevance[idx].max()) > 0:
            ndcg.append(float(retrieval_normalized_dcg(value[idx], relevance[idx], top_k=k)))
        if not torch.isnan(truth[idx]).any() and float(truth[idx].std()) > 0 and float(value[idx].std()) > 0:
            tau.append(float(kendall_rank_corrcoef(value[idx], truth[idx])))
    out = {f"ndcg@{k}": float(np.mean(ndcg)) if ndcg else float("nan")}
    if tau:
        out["kendall_tau_truth"] = float(np.mean(tau))
    if (bias > 0).all() and np.std(bias) > 0:
        out["bias_corr"] = float(np.corrcoef(value.double().numpy(), np.log(bias))[0, 1])
    return out


def top_k_churn(a: torch.Tensor, b: torch.Tensor, table: pa.Table, k: int) -> float:
    """Mean share of each list's top-k that changes between scores ``a`` and ``b`` (lists > k)."""
    churn = []
    for rows in _groups(table):
        if len(rows) <= k:
            continue
        idx = torch.from_numpy(rows)
        top_a = set(torch.topk(a[idx], k).indices.tolist())
        top_b = set(torch.topk(b[idx], k).indices.tolist())
        churn.append(1 - len(top_a & top_b) / k)
    return float(np.mean(churn)) if churn else float("nan")


def outputs_from_scores(scores: dict[str, np.ndarray]):
    """A :class:`RankerOutput` view of :func:`score_table` arrays (for the value model)."""
    from training.models.ranker import RankerOutput

    def pick(prefix: str) -> dict[str, torch.Tensor]:
        return {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in scores.items() if k.startswith(prefix + "/")}

    return RankerOutput(pick("pred"), {}, pick("mbd_mean"), pick("mbd_var"), raw_predictions=pick("raw_pred"))


def evaluate_scores(scores: dict[str, np.ndarray], table: pa.Table, cfg: RankerRunConfig, tasks: dict[str, str]) -> dict[str, float]:
    """Task metrics plus the value ordering's metrics for raw / z / pct transforms."""
    metrics = task_metrics(scores, table, tasks)
    value = ValueModel.from_config(cfg.value, cfg.model.mbd.signals)
    out = outputs_from_scores(scores)
    for transform in ("raw", "z", "pct") if cfg.model.mbd.signals else ("raw",):
        for name, v in value_metrics(value.with_transform(transform)(out), table, cfg.eval.k).items():
            metrics[f"value_{transform}/{name}"] = v
    return metrics


def fit_calibration(model: torch.nn.Module, table: pa.Table, shape: tuple[int, int, int], tasks: dict[str, str],
                    batch_size: int, seed: int) -> dict[str, list[tuple[float, float]]]:  # fmt: skip
    """Fit and set each binary task's per-path Platt map on ``table`` (collective under DMP:
    every rank scores the table; rank 0's fit is broadcast). Returns {task: [(a, b) per path]}."""
    import torch.distributed as dist

    from embeddings.tables import set_mpzch_training
    from training.models.calibration import fit_platt
    from training.models.ranker_scoring import score_table

    module = getattr(model, "module", model)
    model.eval()
    set_mpzch_training(model, False)
    paths = (0, 1) if module.foundation is not None else (0,)
    ends = {path: score_table(model, table, shape, batch_size, float(path), seed) for path in paths}
    labels, masks = label_arrays(table, len(tasks))  # [N, T] each
    maps = torch.tensor([[1.0, 0.0]]).repeat(len(tasks), 2, 1)  # [T, path, (a, b)]: identity
    for t, (name, kind) in enumerate(tasks.items()):
        keep = masks[:, t] > 0
        for path in paths if kind == "binary" else ():
            p = torch.from_numpy(ends[path][f"raw_pred/{name}"][keep]).double().clamp(1e-7, 1 - 1e-7)
            maps[t, path] = torch.tensor(fit_platt(torch.logit(p), torch.from_numpy(labels[keep, t])))
    if dist.is_initialized():
        maps = maps.to(module.calibration.scale.device)  # NCCL broadcasts device tensors only
        dist.broadcast(maps, 0)
        maps = maps.cpu()
    for t in range(len(tasks)):
        for path in (0, 1):
            module.calibration.set_map(t, path, float(maps[t, path, 0]), float(maps[t, path, 1]))
    return {name: [tuple(maps[t, p].tolist()) for p in (0, 1)] for t, name in enumerate(tasks)}


# ---------------------------------------------------------------- the per-worker recipe
def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from embeddings.sharding import combined_optimizer, shard_model
    from embeddings.tables import mpzch_metrics, set_mpzch_training
    from training.checkpoint import checkpoint_to_resume, load_checkpoint, report_checkpoint, save_checkpoint
    from training.models.ranker import build_ranking_model, table_specs
    from training.models.ranker_artifact import export_ranker
    from training.models.ranker_loss import fm_keep_mask, ranking_loss
    from training.models.ranker_scoring import model_inputs, score_table

    cfg = RankerRunConfig.model_validate(config["cfg"])
    run, data_dir = worker_run(config)
    features, tasks = config["features"], config["tasks"]
    # 1. rank, device, seeds and threads
    worker = start_worker(cfg)
    rank, world, device = worker.rank, worker.world, worker.device
    generator = torch.Generator().manual_seed(cfg.seed + rank)

    # 2. model (tables on "meta": DMP allocates only this rank's rows)
    def build(on: torch.device):
        return build_ranking_model(cfg.model, features.dense_names, features.cohort_sizes, cfg.data.history_len, on,
                                   config["mbd_scale"])  # fmt: skip

    model = shard_model(build(torch.device("meta")), table_specs(cfg.model), device,
                        cfg.train.embedding_optimizer, cfg.train.embedding_lr)  # fmt: skip
    # 3. optimizer
    optimizer = combined_optimizer(model, cfg.train.lr, cfg.train.weight_decay)
    shape = (len(features.dense_names), len(features.cohort_sizes), len(tasks))

    # 4. restore (a registered, committed checkpoint only; rank 0 removes what an interrupted save left)
    start_epoch = 0
    checkpoint = checkpoint_to_resume(run, rank)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_epoch = load_checkpoint(model, optimizer, directory)["epoch"] + 1

    def evaluate(table: pa.Table, hit_rate: float) -> dict[str, float]:
        model.eval()
        set_mpzch_training(model, False)
        scores = score_table(model, table, shape, cfg.eval.batch_size, hit_rate, cfg.seed)
        return evaluate_scores(scores, table, cfg, tasks) if rank == 0 else {}

    shard = ray.train.get_dataset_shard("train")
    # what the driver draws its progress bars from
    progress = StepProgress(run, rank, world, cfg.train.log_every, config.get("steps_per_epoch"), logger=logger)
    # 5. epochs
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        set_mpzch_training(model, True)
        progress.start_epoch(epoch)
        t0, steps, examples, sums = time.perf_counter(), 0, 0, {}
        for batch in shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="pyarrow", drop_last=True):
            if cfg.train.max_steps_per_epoch is not None and steps >= cfg.train.max_steps_per_epoch:
                break  # every rank breaks at the same step: shards are equal (streaming_split)
            x = model_inputs(batch, *shape, device)
            keep = fm_keep_mask(batch.num_rows, cfg.model.foundation.dropout, generator).to(device)
            out = model(x["kjt"], x["dense"], x["cohorts"], fm_keep=keep)
            parts = ranking_loss(model.module, out, x["labels"], x["masks"], cfg.model)
            optimizer.zero_grad()
            parts["total"].backward()
            optimizer.step()
            steps += 1
            examples += batch.num_rows
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            progress.step(steps, examples, sums["total"] / steps)
        train_s = time.perf_counter() - t0

        metrics: dict[str, Any] = {f"valid/{k}": v for k, v in evaluate(config["valid"], 1.0).items()}
        metrics.update({f"loss/{k}": v / max(steps, 1) for k, v in sums.items()})
        metrics.update(epoch=epoch, steps=steps, loss=sums.get("total", 0.0) / max(steps, 1),
                       examples_per_s=examples * world / max(train_s, 1e-9), train_s=train_s)  # fmt: skip
        metrics.update(mpzch_metrics(model))
        if rank == 0:
            run.append_metrics(metrics)
            logger.info("epoch %d done: loss %.4f (%.1fs)", epoch, metrics["loss"], train_s)
        with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as tmp:
            save_checkpoint(model, optimizer, {"epoch": epoch}, tmp)
            report_checkpoint(metrics, tmp, epoch)  # two-phase: rank 0's train_state.json commits it

    # 6. per-path calibration of the binary tasks on the validation lists
    if cfg.eval.calibrate:
        progress.stage("calibration", 1, 3)
        maps = fit_calibration(model, config["valid"], shape, tasks, cfg.eval.batch_size, cfg.seed)
        if rank == 0:
            logger.info("calibration (a, b) per path [FM missing, FM present]: %s", maps)

    # 7. test metrics (no FM / FM always present) and the serving artifact
    test = {}
    progress.stage("test metrics", 2, 3)
    for rate in cfg.eval.fm_hit_rates:
        test.update({f"test/fm{rate:g}/{k}": v for k, v in evaluate(config["test"], rate).items()})
    progress.stage("serving export", 3, 3)
    artifact = run.ranker_dir
    staging = artifact / ".dcp"  # every rank writes its shards here; rank 0 gathers them
    dcp.save(model.state_dict(), checkpoint_id=str(staging))
    if run.uri is not None:  # ranks on other nodes: the shards meet in object storage
        storage.upload(staging, storage.join(run.uri, "ranker", ".dcp"))
    dist.barrier()
    if rank == 0:
        if run.uri is not None:
            storage.local_path(storage.join(run.uri, "ranker", ".dcp"))  # into this node's mirror
        plain = build(torch.device("cpu"))
        state = plain.state_dict()
        dcp.load(state, checkpoint_id=str(staging), no_dist=True)
        plain.load_state_dict(state)
        export_ranker(plain.state_dict(), artifact, cfg.model, cfg.value, features, tasks, config["histories"],
                      cfg.data.history_len, f"{run.run_id}/epoch-{cfg.train.epochs - 1:04d}")  # fmt: skip
        shutil.rmtree(staging, ignore_errors=True)
        if run.uri is not None:
            storage.delete_dir(storage.join(run.uri, "ranker", ".dcp"))
        run.write_json(run.eval_path, test)
        run.push()  # a run in object storage: publish ranker/ and eval.json
        logger.info("test: %s", {k: round(v, 4) for k, v in test.items() if "auc" in k or "ndcg" in k})
    dist.barrier()


# ---------------------------------------------------------------- driver
def run(cfg: RankerRunConfig, run_id: str | None = None, config_stem: str = "run") -> RunDir:
    """Train ``cfg`` on a Ray cluster (``ray.init()`` when none is connected); same run id resumes."""

    from embeddings.tables import check_world_size
    from training.data.ranking_examples import build_ranking_data
    from training.models.ranker import build_ranking_model, mbd_scale_of, table_specs

    check_world_size(table_specs(cfg.model), cfg.scaling.num_workers)
    data_dir = storage.local_path(cfg.data.path)
    t0 = time.perf_counter()
    data = build_ranking_data(data_dir, cfg.data.spec(), [t.name for t in cfg.model.tasks], cfg.seed)
    # fail on a bad model section (unknown cohort, MBD signal) before any worker starts
    build_ranking_model(cfg.model, data.features.dense_names, data.features.cohort_sizes, cfg.data.history_len, torch.device("meta"))
    logger.info("prepared %d ranking examples in %.1fs", data.train.num_rows, time.perf_counter() - t0)
    # MBD heads predict in standardized units of each signal: its training-set mean and std
    labels, masks = label_arrays(data.train, len(cfg.model.tasks))
    mbd_scale = mbd_scale_of(cfg.model, torch.from_numpy(labels), torch.from_numpy(masks))
    run_id = run_id or cfg.run_id or new_run_id(config_stem)
    run_dir = create_run(cfg, cfg.runs_dir, run_id, cfg.scaling.num_workers)

    train_columns = ["user_id", "item_id", "history", "dense", "cohorts", "labels", "masks"]
    loop_config = {
        **job_paths(run_dir, cfg),
        "features": data.features,
        "tasks": data.tasks,
        "valid": data.valid,
        "test": data.test,
        "histories": data.histories,
        "mbd_scale": mbd_scale,
    }
    fit_on_ray(train_loop_per_worker, cfg, run_id, loop_config, data.train.select(train_columns))
    return run_dir
