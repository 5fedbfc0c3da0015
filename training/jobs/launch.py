"""Launch a per-worker training recipe on Ray Train: the one place jobs meet ``TorchTrainer``.

Every job gets the same policy: workers and resources from ``cfg.scaling``, gloo on CPU and
nccl on GPU, ``FailureConfig(max_failures=cfg.failure.max_failures)``, the newest 2
checkpoints kept under ``<runs_dir>/<run_id>/`` (so re-running a run id resumes), an
ordered Ray Data dataset so a replayed epoch sends every rank the same rows, and the driver's
``RAYREC_FAILPOINTS`` (if any) forwarded to the workers (``training.failpoints``).

Paths: ``runs_dir`` and ``data.path`` may be local folders or object-storage URIs
(``training.storage``). Ray Train writes checkpoints through ``storage_filesystem``; workers get
the run and the dataset by location (:func:`job_paths`) and open them on their own node
(:func:`worker_run`), with the driver's object-storage credentials in their environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa
from pydantic import BaseModel

from training import storage

if TYPE_CHECKING:
    import torch

    from embeddings.tables import TableSpec
    from training.config import RetrievalRunBase
    from training.runs import RunDir


def job_paths(run: "RunDir", cfg: BaseModel) -> dict[str, str]:
    """What every worker needs to find the run and the dataset from any node: their locations
    (absolute local paths or URIs), never a path only the driver's node has."""
    return {"run_dir": run.location, "data_dir": storage.normalize(cfg.data.path)}


@dataclass(frozen=True)
class Worker:
    """This worker's place in the job: ``rank`` of ``world`` workers, training on ``device``."""

    rank: int
    world: int
    device: "torch.device"


def start_worker(cfg: BaseModel) -> Worker:
    """Step 1 of every recipe: quiet logging, this worker's rank and device (its local GPU under
    ``scaling.use_gpu``), the run's seed in torch and numpy, and as many torch threads as the
    CPUs Ray reserved for the worker (``scaling.cpus_per_worker``; more would fight the other
    workers on the node for cores)."""
    import numpy as np
    import ray.train
    import torch

    from training.log_setup import configure_logging

    ctx = ray.train.get_context()
    configure_logging()
    device = torch.device("cuda", ctx.get_local_rank()) if cfg.scaling.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    return Worker(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device)


def worker_run(config: dict[str, Any]) -> tuple["RunDir", Path]:
    """On a worker: the run (this node's copy refreshed, so rank 0 appends to the metrics that
    are already there after a restart on another node) and the dataset folder on this node.

    This is also the shared-storage check, made where it can be right: on every node a worker
    lands on, including nodes an autoscaler adds later. A local ``runs_dir`` or ``data.path``
    must show this node the files the driver wrote or read there (a shared mount); else the
    run stops here, naming the path, instead of each node writing its own partial run.

    Raises:
        SharedStorageError: the run folder or dataset is not visible on this node.
    """
    import platform

    from training.runs import RunDir

    run = RunDir.open(config["run_dir"]).pull()
    if run.uri is None and not run.meta_path.is_file():
        raise storage.SharedStorageError(
            f"runs_dir: {run.path} does not hold this run's meta.json on node {platform.node()}, although the "
            "driver wrote it there: the path is local to the driver's node. Use object storage "
            "(runs_dir=s3://bucket/runs) or a mount every node shares."
        )
    data = config["data_dir"]
    if not storage.is_remote(data) and not Path(data, "dataset.json").is_file():
        raise storage.SharedStorageError(
            f"data.path: {data} has no dataset.json on node {platform.node()}, although the driver read it: "
            "put the dataset in object storage (data.path=s3://bucket/data/NAME) or on a shared mount."
        )
    return run, storage.local_path(data)


def fit_on_ray(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    cfg: BaseModel,
    run_id: str,
    loop_config: dict[str, Any],
    train_table: pa.Table,
) -> None:
    """Run ``train_loop_per_worker`` over ``train_table`` (split equally across workers).

    Starts a local Ray when none is connected (``training.log_setup.init_ray``) and draws the
    workers' progress on this driver while they train (``training.progress``). Raises the
    training error, if any.

    Args:
        cfg: a run config with ``scaling``, ``failure`` and ``runs_dir`` sections.
        loop_config: what every worker receives (``cfg`` as JSON and ``steps_per_epoch`` are added).
        train_table: the training examples; Ray Data serves them as the "train" shard.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.failpoints import worker_env
    from training.log_setup import init_ray
    from training.progress import TrainingProgress
    from training.runs import run_dir

    # fail points travel in the workers' own env (a shared Ray arms them for this run only);
    # a bad RAYREC_FAILPOINTS fails here, before Ray starts
    run = run_dir(cfg.runs_dir, run_id)
    failpoints = worker_env(run.failpoints_dir)
    env_vars = {**failpoints, **storage.storage_env(), **_forwarded_env()}
    filesystem, storage_path = storage.resolve(cfg.runs_dir)
    if not ray.is_initialized():
        init_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # rayrec draws its own progress (training.progress)
    context.execution_options.preserve_order = True  # same rows to the same rank on every (re)run
    steps = steps_per_epoch(train_table.num_rows, cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "steps_per_epoch": steps, **loop_config},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_id,
            storage_path=storage_path,
            storage_filesystem=filesystem if storage.is_remote(cfg.runs_dir) else None,
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env_vars} if env_vars else None,
        ),
        datasets={"train": ray.data.from_arrow(train_table)},
    )
    with TrainingProgress(run, cfg.train.epochs, steps):
        result = trainer.fit()
    if result.error is not None:
        raise result.error


def run_retrieval_job(
    cfg: "RetrievalRunBase",
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    table_specs: list["TableSpec"],
    run_id: str | None,
    config_stem: str,
    extra_shared: Callable[[pa.Table], dict[str, Any]] | None = None,
    window: int | None = None,
) -> "RunDir":
    """The driver the retrieval jobs (two-tower, MFLI, HSNN) share: check the tables fit the
    workers, create (or reopen, to resume) the run, build the examples, train on Ray.

    Args:
        table_specs: the model's MPZCH tables (``embeddings.tables.TableSpec``), checked against
            the world size before anything starts.
        run_id: the run folder name; ``cfg.run_id``, else ``<config_stem>-<UTC time>``, when None.
        extra_shared: what a job adds to every worker's loop config from the shuffled examples
            (HSNN: its test-time-training pool).
        window: with all-position training, the history window each example holds
            (``training.data.retrieval_data.retrieval_data``); None: one example per target.
    """
    from embeddings.tables import check_world_size
    from training.data.retrieval_data import retrieval_data
    from training.runs import create_run, new_run_id

    check_world_size(table_specs, cfg.scaling.num_workers)
    run_id = run_id or cfg.run_id or new_run_id(config_stem)
    run = create_run(cfg, cfg.runs_dir, run_id, cfg.scaling.num_workers)
    data_dir = storage.local_path(cfg.data.path)
    examples, shared = retrieval_data(data_dir, cfg.data.history_len, cfg.eval.max_users, cfg.seed, window=window)
    if extra_shared is not None:
        shared |= extra_shared(examples)
    fit_on_ray(train_loop_per_worker, cfg, run_id, job_paths(run, cfg) | shared, examples)
    return run


def steps_per_epoch(num_rows: int, cfg: BaseModel) -> int:
    """Steps each worker takes per epoch: its equal share of the rows in full batches, capped by
    ``train.max_steps_per_epoch``."""
    steps = num_rows // cfg.scaling.num_workers // cfg.train.batch_size
    cap = cfg.train.max_steps_per_epoch
    return min(steps, cap) if cap is not None else steps


def _forwarded_env() -> dict[str, str]:
    """The driver's commit, so a worker's records name it even where no ``.git`` was shipped
    (``RAYREC_CACHE_DIR`` is deliberately not forwarded: each node keeps its own mirrors)."""
    from training.runs import git_commit

    commit = git_commit()
    return {"RAYREC_GIT_COMMIT": commit} if commit else {}
