"""Typed run configs: YAML in, validated before any worker starts, written resolved into the run.

One pydantic model per run kind; ``kind`` selects the job (``training.jobs.JOBS``), whose module
exposes its config model as ``CONFIG``. The sections every job shares live here. Unknown keys and
bad values fail with the dotted key named, e.g. ``train.batch_size: Input should be greater
than 0``. ``--set a.b=c`` overrides are parsed as YAML scalars (``--set train.epochs=3``).

Example::

    cfg = load_config("configs/ml100k.yaml", overrides=["train.epochs=1"])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class DataConfig(_Strict):
    """Where the dataset lives and how examples are cut from it.

    Args:
        path: dataset folder (``data/<name>``, see docs/architecture.md) or a URI.
        history_len: most recent items kept as the user's history feature.
    """

    path: str = "data/ml-100k"
    history_len: int = Field(50, gt=0, le=10_000)


class TableConfig(_Strict):
    """MPZCH settings shared by the model's id tables (see ``embeddings.tables.TableSpec``).

    Args:
        clock_hour: hours since the epoch that eviction takes as "now" (None: the wall clock).
            Set only to replay past traffic on the data's time, e.g. one simulated day per
            resumed run in the churn benchmark (benchmarks/mpzch_churn_training.py).
    """

    load_factor: float = Field(0.5, gt=0, le=1)
    max_probe: int = Field(128, gt=0, le=4096)
    buckets: int = Field(8, gt=0)
    eviction: Literal["none", "ttl", "lru"] = "none"
    ttl_hours: int = Field(24 * 7, gt=0)
    clock_hour: Optional[int] = Field(None, ge=0)

    def spec_kwargs(self, dim: int) -> dict:
        """The ``TableSpec`` keyword arguments every table of a model shares (dim E and these settings)."""
        return {"dim": dim, "load_factor": self.load_factor, "max_probe": self.max_probe,
                "buckets": self.buckets, "eviction": self.eviction, "ttl_hours": self.ttl_hours,
                "clock_hour": self.clock_hour}


class SequenceConfig(_Strict):
    """The sequential user tower (``model.user_tower: sequential``,
    :mod:`training.models.sequential`): causal self-attention over the time-ordered history.

    Args:
        max_len: T, most recent history items the tower reads (≤ ``data.history_len`` is
            what it can get; positions are counted from the most recent item).
        blocks: Transformer blocks (pre-norm, causal).
        heads: attention heads per block (must divide the table dim E).
        ffn_mult: feed-forward width as a multiple of E.
        dropout: dropout on the input and inside every block (SASRec: 0.2-0.5 on small data).
        use_user_id: also feed the user's id row to the output MLP (SASRec reads only the sequence).
        positions: how slots are numbered: ``recency`` (0 = the most recent item) or ``start``
            (0 = the oldest item read; with ``train_positions: all`` every trained slot is then
            the state served for the history ending there).
        train_positions: ``last``: one training example per train interaction, its history the
            user's previous items, the loss on the last slot's state only (the state a retriever
            serves). ``all``: SASRec's objective, one example per window of a user's time-ordered
            train items, every slot t predicting the item after it, so one pass over a user's
            history trains every prefix at once (two-tower only; ``train.batch_size`` then counts
            windows, each of up to ``max_len`` targets).
    """

    max_len: int = Field(50, gt=0, le=10_000)
    blocks: int = Field(2, gt=0, le=12)
    heads: int = Field(2, gt=0)
    ffn_mult: int = Field(2, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    use_user_id: bool = True
    train_positions: Literal["last", "all"] = "last"
    positions: Literal["recency", "start"] = "recency"


class UserTowerChoice(BaseModel):
    """Which user tower a retriever builds (two-tower, MFLI and HSNN share this seam,
    :func:`training.models.user_tower.build_user_tower`).

    Args:
        user_tower: ``mean``: ``[id row ‖ mean of history rows]`` → MLP (order-free);
            ``sequential``: causal self-attention over the ordered history → MLP.
        sequence: settings of the sequential tower (ignored by ``mean``).
    """

    user_tower: Literal["mean", "sequential"] = "mean"
    sequence: SequenceConfig = Field(default_factory=SequenceConfig)


class TwoTowerModelConfig(_Strict, UserTowerChoice):
    """Two-tower retrieval model.

    Args:
        dim: output embedding dimension of both towers.
        embedding_dim: id table dimension.
        hidden: hidden layer widths of each tower's MLP.
        temperature: softmax temperature of the in-batch loss.
        logq_correction: subtract log item frequency from in-batch logits (Yi et al. 2019).
        user_cardinality / item_cardinality: distinct ids the tables are sized for.
        user_tower / sequence: the user tower (:class:`UserTowerChoice`).
    """

    dim: int = Field(64, gt=0)
    embedding_dim: int = Field(64, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [128])
    temperature: float = Field(0.05, gt=0)
    logq_correction: bool = True
    user_cardinality: int = Field(2_000, gt=0)
    item_cardinality: int = Field(4_000, gt=0)
    tables: TableConfig = Field(default_factory=TableConfig)


class TrainLoopConfig(_Strict):
    """The optimisation loop.

    Args:
        epochs: passes over the training examples.
        batch_size: examples per worker per step.
        lr: dense (tower MLP) learning rate, AdamW.
        embedding_lr / embedding_optimizer: fused optimizer of the id tables
            (fbgemm on CPU supports rowwise_adagrad, adagrad, sgd).
        max_steps_per_epoch: cap for smoke runs (None: the whole epoch).
        log_every: steps between progress log lines.
        patience: stop after this many epochs in a row without a better valid Recall@10 and
            serve the best epoch's model (its weights restored before the test metrics and the
            index); None trains every epoch and serves the last. Epochs chosen on valid only.
    """

    epochs: int = Field(5, gt=0)
    batch_size: int = Field(512, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    embedding_lr: float = Field(0.05, gt=0)
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    max_steps_per_epoch: Optional[int] = Field(None, gt=0)
    log_every: int = Field(20, gt=0)
    patience: Optional[int] = Field(None, gt=0)


class EvalConfig(_Strict):
    """Full-ranking evaluation (leave-one-out, seen items masked).

    Args:
        ks: cut-offs for Recall/NDCG/HR/MRR.
        max_users: evaluate at most this many users (None: all), a fixed seeded sample.
    """

    ks: list[int] = Field(default_factory=lambda: [10, 50, 100])
    max_users: Optional[int] = Field(None, gt=0)


class ScalingConfig(_Strict):
    """Ray Train workers.

    Args:
        use_gpu: one GPU per worker, nccl instead of gloo (configs/*-gpu.yaml).
        resources_per_worker: custom Ray resources each worker also asks for (e.g.
            ``{trainer: 1}`` to keep training on the nodes that advertise it).
        placement_strategy: Ray placement group strategy of the worker group; ``SPREAD`` /
            ``STRICT_SPREAD`` put workers on different nodes.
    """

    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class FailureConfig(_Strict):
    """Restarts from the latest checkpoint (Ray Train ``FailureConfig``)."""

    max_failures: int = Field(2, ge=-1)


class ContinualConfig(_Strict):
    """Incremental training from the feedback log (``rayrec train --continue``,
    training/jobs/continue_retrieval.py).

    Args:
        positives: event kinds that are a positive (user, item) pair. Impressions are not:
            the two-tower learns from positives against in-batch negatives, and an impression
            without a click is no evidence of interest (nor a reliable negative: position and
            exposure bias). They still count as read: the watermark moves past them.
        epochs: passes over the new positives (1: each event trained exactly once).
        batch_size: most examples per worker per step (fewer when there are few new events).
        replay: examples of older interactions mixed in per new positive, drawn at random from
            the run's interactions (``training.data.feedback_examples.with_replay`` says why,
            and why it is off by default).
    """

    positives: list[str] = Field(default_factory=lambda: ["click", "engagement"], min_length=1)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(256, gt=0)
    replay: float = Field(0.0, ge=0)


class RetrievalRunBase(_Strict):
    """The sections every retrieval run config has (``training.jobs.launch.run_retrieval_job``
    reads them); a job's config class names its ``kind`` and ``model`` (kept in this place in
    the field order, so every run's config.yaml reads alike) and adds its own sections."""

    kind: str
    seed: int = 42
    run_id: Optional[str] = None
    runs_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: BaseModel
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)


class RetrievalRunConfig(RetrievalRunBase):
    """``kind: two_tower``: train a two-tower retriever over MPZCH tables (training/jobs/train_retrieval.py)."""

    kind: Literal["two_tower"] = "two_tower"
    model: TwoTowerModelConfig = Field(default_factory=TwoTowerModelConfig)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)


def two_tower_only(cfg: Any) -> Any:
    """Refuse the two-tower-only training options in another retriever's run config (MFLI and
    HSNN share the sections but their jobs do not read these keys); a ``model_validator``."""
    if cfg.model.user_tower == "sequential" and cfg.model.sequence.train_positions != "last":
        raise ValueError(f"model.sequence.train_positions: {cfg.model.sequence.train_positions!r} is two-tower only (kind {cfg.kind!r} trains 'last')")
    if cfg.train.patience is not None:
        raise ValueError(f"train.patience: two-tower only (kind {cfg.kind!r} trains every epoch)")
    return cfg


def config_class(kind: str) -> type[BaseModel]:
    """The config model of a run kind: the ``CONFIG`` of its job module (``training.jobs.JOBS``)."""
    import importlib

    from training.jobs import JOBS

    if kind not in JOBS:
        raise ConfigError(f"kind: unknown run kind {kind!r}; known: {sorted(JOBS)}")
    try:
        module = importlib.import_module(JOBS[kind])
    except ModuleNotFoundError as err:
        raise ConfigError(f"kind: run kind {kind!r} is not available in this build ({err})") from None
    return module.CONFIG


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def parse_config(raw: dict[str, Any], source: str = "<config>") -> BaseModel:
    """Validate a config dict; errors name the dotted key and the source file."""
    kind = raw.get("kind", "two_tower")
    try:
        model = config_class(kind)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "<root>"
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {key}: {msg}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> BaseModel:
    """Read a YAML run config, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
