"""One builder from feature specs to MPZCH-managed TorchRec tables; every model uses it.

A :class:`TableSpec` names a table, the id features that read it, its expected cardinality and
dimension, and its MPZCH settings. :func:`build_tables` turns specs into a
:class:`embeddings.mpzch.MPZCHEmbeddingCollection` (a managed-collision EC) whose every table sits behind an
:class:`embeddings.mpzch.MPZCHModule`, sized so that it shards row-wise by bucket
(``rows % buckets == 0`` and ``buckets % world_size == 0``).

Raw 64-bit ids go straight in (no dense re-indexing anywhere upstream).

Example::

    tables = build_tables([
        TableSpec(name="user", features=["user_id"], cardinality=1_000, dim=32),
        TableSpec(name="item", features=["item_id", "history"], cardinality=2_000, dim=32),
    ], device=torch.device("cpu"))
    out = tables(kjt)  # (dict feature -> JaggedTensor of [n_ids, dim], None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.hash_mc_evictions import HashZchEvictionConfig, HashZchEvictionPolicyName
from torchrec.modules.mc_modules import ManagedCollisionCollection

from embeddings.mpzch import MPZCHEmbeddingCollection, MPZCHModule

EvictionPolicy = Literal["none", "ttl", "lru"]

_POLICY_NAMES = {
    "ttl": HashZchEvictionPolicyName.SINGLE_TTL_EVICTION,
    "lru": HashZchEvictionPolicyName.LRU_EVICTION,
}


@dataclass
class TableSpec:
    """What a model asks of one id table.

    Args:
        name: table name (also the MPZCH module and metric name).
        features: the KJT feature names that look ids up in this table.
        cardinality: distinct ids expected to be live at once.
        dim: embedding dimension.
        load_factor: target rows in use / rows; rows = cardinality / load_factor, rounded up
            to a multiple of ``buckets``. MPZCH is collision-free up to about 0.5 at
            max_probe 128 (docs/benchmarks/mpzch.md).
        max_probe: slots probed per id before falling back to a shared row.
        buckets: hash buckets; rows shard by bucket, so it must divide by the world size.
            The default (8) serves 1, 2, 4 or 8 ranks and resharding between them.
        eviction: "none", "ttl" (ids unseen for ``ttl_hours`` give their row up) or "lru"
            (a full probe window takes its least recently seen expired id).
        ttl_hours: time to live for "ttl" and "lru".
        clock_hour: the hour eviction takes as "now" (None: the wall clock); a replay or
            simulation of past days pins it to the data's hour (``MPZCHModule``).
        rows: table rows, when set explicitly (else derived from cardinality / load_factor).
        init_fn: row initialiser, TorchRec's ``EmbeddingConfig.init_fn`` (None: uniform in
            ``±sqrt(1/rows)``). Evicted rows are redrawn with it too, so it must treat rows
            independently (uniform, normal, constant).
    """

    name: str
    features: list[str]
    cardinality: int
    dim: int
    load_factor: float = 0.5
    max_probe: int = 128
    buckets: int = 8
    eviction: EvictionPolicy = "none"
    ttl_hours: int = 24 * 7
    clock_hour: Optional[int] = None
    rows: Optional[int] = field(default=None)
    init_fn: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]] = None

    def __post_init__(self) -> None:
        if self.cardinality <= 0 or self.dim <= 0:
            raise ValueError(f"table {self.name!r}: cardinality and dim must be positive")
        if not 0 < self.load_factor <= 1:
            raise ValueError(f"table {self.name!r}: load_factor must be in (0, 1]")
        if self.eviction not in ("none", "ttl", "lru"):
            raise ValueError(f"table {self.name!r}: eviction must be none, ttl or lru")
        if self.rows is None:
            raw = math.ceil(self.cardinality / self.load_factor)
            self.rows = math.ceil(raw / self.buckets) * self.buckets
        if self.rows % self.buckets:
            raise ValueError(f"table {self.name!r}: rows {self.rows} not a multiple of buckets {self.buckets}")


def check_world_size(specs: Sequence[TableSpec], world_size: int) -> None:
    """Raise when a table cannot shard row-wise over ``world_size`` ranks."""
    for spec in specs:
        if spec.buckets % world_size:
            raise ValueError(
                f"table {spec.name!r}: buckets={spec.buckets} must be a multiple of the "
                f"world size {world_size} (rows shard by bucket)"
            )


def build_mpzch_module(spec: TableSpec, device: torch.device) -> MPZCHModule:
    """The managed-collision module of one table (identities/metadata on ``device``)."""
    policy = _POLICY_NAMES.get(spec.eviction)
    config = (
        HashZchEvictionConfig(features=list(spec.features), single_ttl=spec.ttl_hours)
        if policy is not None
        else None
    )
    return MPZCHModule(
        zch_size=spec.rows,
        device=device,
        total_num_buckets=spec.buckets,
        max_probe=spec.max_probe,
        name=spec.name,
        eviction_policy_name=policy,
        eviction_config=config,
        clock_hour=spec.clock_hour,
    )


def build_tables(
    specs: Sequence[TableSpec], device: torch.device
) -> MPZCHEmbeddingCollection:
    """An MPZCH-managed :class:`EmbeddingCollection` (sequence output, one row per id).

    Build it on ``torch.device("meta")`` when the model is about to be sharded: DMP
    materialises only each rank's rows.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate table names in {names}")
    configs = [
        EmbeddingConfig(
            name=s.name,
            embedding_dim=s.dim,
            num_embeddings=s.rows,
            feature_names=list(s.features),
            init_fn=s.init_fn,
        )
        for s in specs
    ]
    ec = EmbeddingCollection(tables=configs, device=device)
    # MC modules hold identities/metadata: keep them off "meta" so their -1 fill is real.
    mc_device = torch.device("cpu") if device.type == "meta" else device
    mcc = ManagedCollisionCollection(
        managed_collision_modules={s.name: build_mpzch_module(s, mc_device) for s in specs},
        embedding_configs=configs,
    )
    return MPZCHEmbeddingCollection(ec, mcc, return_remapped_features=False)


def mpzch_modules(model: torch.nn.Module) -> dict[str, MPZCHModule]:
    """Every MPZCH module inside ``model`` (sharded or not), by table name."""
    return {m._name or n: m for n, m in model.named_modules() if isinstance(m, MPZCHModule)}


def set_mpzch_training(model: torch.nn.Module, training: bool) -> None:
    """Switch the MPZCH modules between insert (train) and lookup (eval) modes.

    With eviction configured, upstream eval needs ``reset_intrainer_bulk_eval_mode`` first.
    """
    for module in mpzch_modules(model).values():
        if training:
            module.reset_training_mode()
        else:
            module.reset_intrainer_bulk_eval_mode()


def mpzch_metrics(model: torch.nn.Module) -> dict[str, float]:
    """MPZCH counters since the last call, summed over ranks (occupancy averaged); collective."""
    import torch.distributed as dist

    out: dict[str, float] = {}
    for module in mpzch_modules(model).values():
        out.update(module.table_stats().snapshot())
    keys = sorted(out)
    vec = torch.tensor([out[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(vec)
    world = dist.get_world_size()
    summed = {k: (v / world if k.endswith("occupancy") else v) for k, v in zip(keys, vec.tolist())}
    for key in [k for k in summed if k.endswith("/eviction_age_hours_sum")]:
        table = key[: -len("_sum")]
        evictions = summed[table.replace("eviction_age_hours", "evictions")]
        summed[table] = summed[key] / evictions if evictions else 0.0
    return summed


def held_ids(model: torch.nn.Module, table: str) -> torch.Tensor:
    """The ids that hold a row of their own in ``table``, over all ranks ``[H]`` (int64, sorted);
    collective when a process group is up.

    Why it matters: MPZCH's readonly lookup maps an id it never admitted (or evicted) to a
    fallback row, another id's row, so an id model has no vector of its own for it. Whoever
    serves or scores such a model keeps to these ids.
    """
    import torch.distributed as dist

    ids = mpzch_modules(model)[table]._hash_zch_identities.view(-1)
    ids = ids[ids != -1].to(torch.int64).cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        shards: list = [None] * dist.get_world_size()
        dist.all_gather_object(shards, ids)
        ids = torch.cat(shards)
    return torch.sort(ids).values


def identities_digest(model: torch.nn.Module) -> dict[str, list[int]]:
    """Per table ``[ids held, Σ id mod p1, Σ id mod p2]`` over all ranks; collective.

    The same on any world size (row-wise shards add up), so a restored table can be checked
    against the one that was saved, whatever the resharding.
    """
    import torch.distributed as dist

    out: dict[str, list[int]] = {}
    for name, module in sorted(mpzch_modules(model).items()):
        ids = module._hash_zch_identities.view(-1)
        ids = ids[ids != -1].to(torch.int64)
        vec = torch.tensor([ids.numel(), int((ids % 2_147_483_647).sum()), int((ids % 1_000_000_007).sum())], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(vec)
        out[name] = vec.tolist()
    return out
