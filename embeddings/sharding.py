"""Row-wise sharding of MPZCH tables with DistributedModelParallel, on CPU and on GPU.

Why a sharder subclass: TorchRec's managed-collision sharder offers UVM-caching and key-value
kernels on any device, and the planner then fails on CPU (``Unrecognized or unsupported
compute kernel: fused_uvm_caching``). On CPU we offer only the ``fused`` kernel; on GPU the
upstream choices stay. Tables are sharded row-wise only: MPZCH routes each raw id to the rank
that owns its bucket, so a table's identities, metadata and rows live together.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torchrec.distributed.mc_embedding import (
    ManagedCollisionEmbeddingCollectionSharder,
    ShardedManagedCollisionEmbeddingCollection,
)
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from embeddings.eviction import reset_rows_, table_init_fn
from embeddings.mpzch import MPZCHEmbeddingCollection, MPZCHModule
from embeddings.tables import TableSpec

# fbgemm's CPU TBE supports exact Adagrad, row-wise Adagrad and SGD; Adam only on CUDA.
_EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


class ShardedMPZCHEmbeddingCollection(ShardedManagedCollisionEmbeddingCollection):
    """The sharded MPZCH collection; evictions reset rows on CPU too.

    Upstream's ``_evict`` calls ``fbgemm::reset_weight_momentum`` (CUDA only). On CPU the
    fused kernel's weights and optimizer states are plain host tensors (``split_embedding_weights``
    and ``split_optimizer_states`` return views), so the rows are reset through them. MPZCH
    reports evicted slots in the table's global row space; this rank's kernel holds rows from
    ``output_segments[start_bucket]`` on. Reset rows are drawn from the unsharded table's config
    (its ``init_fn``, whose default bound is over the global row count), not from the shard's
    ``_zch_size`` (the local row count, which would draw them sqrt(world size) wider).
    """

    def _evict(self, evictions_per_table: dict[str, Optional[torch.Tensor]]) -> None:
        upstream: dict[str, Optional[torch.Tensor]] = {}
        for table, rows in evictions_per_table.items():
            if rows is None or rows.numel() == 0:
                continue
            tbe, table_index = self._table_to_tbe_and_index[table]
            if not getattr(tbe, "use_cpu", False):
                upstream[table] = rows
                continue
            module = self._mpzch_module(table)
            local = rows.to(torch.int64) - module._output_segments[module._start_bucket]
            t = int(table_index.item())
            weight = tbe.split_embedding_weights()[t]
            states = tbe.split_optimizer_states()[t] if tbe.optimizer.value != "exact_sgd" else []
            init_fn = table_init_fn(self._embedding_module._table_name_to_config[table])
            reset_rows_(weight, local, init_fn, states)
        if upstream:
            super()._evict(upstream)

    def _mpzch_module(self, table: str) -> MPZCHModule:
        for module in self._managed_collision_collection.modules():
            if isinstance(module, MPZCHModule) and module._name == table:
                return module
        raise KeyError(f"no MPZCH module for table {table!r}")


class MPZCHSharder(ManagedCollisionEmbeddingCollectionSharder):
    """The managed-collision EC sharder for :class:`MPZCHEmbeddingCollection`, limited to what
    works on the device at hand, producing :class:`ShardedMPZCHEmbeddingCollection`."""

    @property
    def module_type(self) -> type[MPZCHEmbeddingCollection]:
        return MPZCHEmbeddingCollection

    @property
    def sharded_module_type(self) -> type[ShardedMPZCHEmbeddingCollection]:
        return ShardedMPZCHEmbeddingCollection

    def shard(self, module, params, env, device=None, module_fqn=None) -> ShardedMPZCHEmbeddingCollection:
        return ShardedMPZCHEmbeddingCollection(
            module,
            params,
            ec_sharder=self._e_sharder,
            mc_sharder=self._mc_sharder,
            env=env,
            device=device or torch.device("cpu"),
        )

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = super().compute_kernels(sharding_type, compute_device_type)
        if compute_device_type == "cpu":
            return [k for k in kernels if k == "fused"]
        return kernels

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return [ShardingType.ROW_WISE.value]


def shard_model(
    model: torch.nn.Module,
    specs: list[TableSpec],
    device: torch.device,
    optimizer: str = "rowwise_adagrad",
    lr: float = 1e-3,
) -> DistributedModelParallel:
    """Wrap ``model`` in DMP with its MPZCH tables row-wise across the process group.

    The embedding rows get TorchRec's fused optimizer (the update runs inside the backward
    pass, in fbgemm's kernel, with its state sharded beside the rows); build the optimizer for
    everything else with :func:`combined_optimizer`.

    Args:
        model: a model holding MPZCH tables built by :func:`embeddings.tables.build_tables`,
            ideally on the "meta" device so only this rank's rows are allocated.
        specs: the tables' specs (planner constraints: row-wise, fused kernel on CPU).
        device: this rank's compute device.
        optimizer: "rowwise_adagrad", "adagrad", "sgd", or "adam" (CUDA only) for the rows.
        lr: learning rate of the embedding rows.
    """
    if optimizer not in _EMBEDDING_OPTIMIZERS:
        raise ValueError(f"unknown embedding optimizer {optimizer!r}: use one of {sorted(_EMBEDDING_OPTIMIZERS)}")
    if optimizer == "adam" and device.type == "cpu":
        raise ValueError("embedding optimizer 'adam' needs CUDA (fbgemm's CPU kernel has no Adam); use rowwise_adagrad")
    for module in model.modules():
        if isinstance(module, EmbeddingCollection):
            apply_optimizer_in_backward(_EMBEDDING_OPTIMIZERS[optimizer], module.parameters(), {"lr": lr})

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    kernels = ["fused"] if device.type == "cpu" else None
    constraints = {
        s.name: ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value], compute_kernels=kernels)
        for s in specs
    }
    sharder = MPZCHSharder()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        constraints=constraints,
    )
    if dist.is_initialized():
        plan = planner.collective_plan(model, [sharder], dist.group.WORLD)
    else:
        plan = planner.plan(model, [sharder])
    return DistributedModelParallel(model, device=device, plan=plan, sharders=[sharder])


def combined_optimizer(dmp: DistributedModelParallel, lr: float, weight_decay: float = 0.0) -> CombinedOptimizer:
    """DMP's fused embedding optimizer plus AdamW over the dense parameters, as one optimizer.

    Its ``state_dict`` is keyed by parameter name, so it checkpoints with DCP beside the model.
    """
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense])
