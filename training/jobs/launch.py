"""Launch a per-worker training recipe on Ray Train: the one place jobs meet ``TorchTrainer``.

Every job gets the same policy: workers and resources from ``cfg.scaling``, gloo on CPU and
nccl on GPU, ``FailureConfig(max_failures=cfg.failure.max_failures)``, the newest 2
checkpoints kept under ``<runs_dir>/<run_id>/`` (so re-running a run id resumes), an
ordered Ray Data dataset so a replayed epoch sends every rank the same rows, and the driver's
``RAYREC_FAILPOINTS`` (if any) forwarded to the workers (``training.failpoints``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from pydantic import BaseModel


def fit_on_ray(
    train_loop_per_worker: Callable[[dict[str, Any]], None],
    cfg: BaseModel,
    run_id: str,
    loop_config: dict[str, Any],
    train_table: pa.Table,
) -> None:
    """Run ``train_loop_per_worker`` over ``train_table`` (split equally across workers).

    ``ray.init()`` is called when no Ray is connected. Raises the training error, if any.

    Args:
        cfg: a run config with ``scaling``, ``failure`` and ``runs_dir`` sections.
        loop_config: what every worker receives (``cfg`` as JSON is added).
        train_table: the training examples; Ray Data serves them as the "train" shard.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.failpoints import worker_env
    from training.runs import run_dir

    # fail points travel in the workers' own env (a shared Ray arms them for this run only);
    # a bad RAYREC_FAILPOINTS fails here, before Ray starts
    failpoints = worker_env(run_dir(cfg.runs_dir, run_id).failpoints_dir)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # rayrec logs its own progress
    context.execution_options.preserve_order = True  # same rows to the same rank on every (re)run
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), **loop_config},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_id,
            storage_path=str(Path(cfg.runs_dir).resolve()),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": failpoints} if failpoints else None,
        ),
        datasets={"train": ray.data.from_arrow(train_table)},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
