"""The ranker's model config: tasks, architecture, the MBD branch and the foundation model.

The ``model`` section of a ranker run config (``configs/*-ranker.yaml``, validated by
:class:`training.jobs.train_ranker.RankerRunConfig`) and of the serving artifact's
``ranker.json``. Pydantic, ``extra="forbid"``: a typo in a YAML key fails at load, not halfway
through a run. Builders (:func:`training.models.ranker.build_ranking_model`) read these; modules
take built objects.

Example::

    cfg = RankerModelConfig(tasks=[TaskConfig(name="like"), TaskConfig(name="rating", loss="mse")],
                            mbd=MBDConfig(signals={"rating": "gaussian"}, cohort=["genre"]))
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.config import TableConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Section):
    """One prediction task.

    Args:
        name: a task of the data source (``training.data.ranking_examples.TASKS``).
        loss: "bce" (binary tasks), "mse" or "huber" (regression).
        log_target: regress log1p(y) (heavy-tailed targets); predictions come back as expm1.
        weight: the task's share of the loss.
    """

    name: str
    loss: Literal["bce", "mse", "huber"] = "bce"
    log_target: bool = False
    weight: float = Field(1.0, ge=0)


class MBDConfig(_Section):
    """The MBD branch: which signals, which cohort ("partial feature set"), how isolated.

    Args:
        signals: task name → family ("gaussian" or "lognormal").
        cohort: cohort feature names (of the dataset's cohort features) the heads see.
        hidden: head MLP widths.
        embeddings: "own" (default): MBD has its own cohort embedding tables, trained by its
            loss alone, so it is isolated from the trunk by construction. "shared": the heads
            read the ranker's cohort embeddings. Why "own" is the default: the trunk also sees
            dense features (log item length), learns the bias from those and leaves its bucket
            embeddings barely trained; MBD heads on them fitted the cohort means poorly (corr
            0.83 with the empirical cell means on synth) and left a third of the length bias in
            the debiased value (docs/benchmarks/ranking.md).
        stop_gradient: with shared embeddings, detach them so MBD's loss does not reshape the
            trunk (on by default; off is the ablation).
        weight: the MBD loss's share of the total loss.
    """

    signals: dict[str, Literal["gaussian", "lognormal"]] = Field(default_factory=dict)
    cohort: list[str] = Field(default_factory=list)
    hidden: list[int] = Field(default_factory=lambda: [32])
    embeddings: Literal["own", "shared"] = "own"
    stop_gradient: bool = True
    weight: float = Field(1.0, ge=0)


class FoundationConfig(_Section):
    """The foundation model and how the ranker consumes it.

    Args:
        enabled: build the FM (off: the ranker has no FM input at all).
        dim / layers / heads: FM width, depth, attention heads.
        dropout: probability that a training row's FM embedding is replaced by the missing
            embedding; "uniform" draws that probability from U(0, 1) per batch, so the ranker
            sees every hit rate.
        weight: the FM's own task loss share.
        impute: the missing path estimates the FM embedding from the ranker's features (see
            :class:`RankerArch`); off (the default, and what older artifacts were trained
            with): one learned missing embedding.
        impute_weight: the distillation loss's share (:func:`imputation_loss`).
    """

    enabled: bool = True
    dim: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(4, gt=0)
    dropout: float | Literal["uniform"] = "uniform"
    weight: float = Field(1.0, ge=0)
    impute: bool = False
    impute_weight: float = Field(1.0, ge=0)


class RankerModelConfig(_Section):
    """The ranker's model section.

    Args:
        tasks: prediction tasks, in head order.
        arch: "shared_bottom" or "mmoe".
        embedding_dim: id table dim E; cohort_dim: E_c per cohort feature.
        hidden: shared bottom (or each MMoE expert) widths; experts: MMoE experts.
        user_cardinality / item_cardinality: distinct ids the MPZCH tables are sized for.
    """

    tasks: list[TaskConfig]
    arch: Literal["shared_bottom", "mmoe"] = "shared_bottom"
    embedding_dim: int = Field(32, gt=0)
    cohort_dim: int = Field(8, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    experts: int = Field(4, gt=0)
    user_cardinality: int = Field(2_000, gt=0)
    item_cardinality: int = Field(4_000, gt=0)
    tables: TableConfig = Field(default_factory=TableConfig)
    mbd: MBDConfig = Field(default_factory=MBDConfig)
    foundation: FoundationConfig = Field(default_factory=FoundationConfig)
