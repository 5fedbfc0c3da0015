"""MPZCH: multi-probe zero-collision hashing that trains on CPU as well as on GPU.

TorchRec ships MPZCH as :class:`HashZchManagedCollisionModule`, whose single kernel call,
``_zero_collision_hash``, goes to ``torch.ops.fbgemm.zero_collision_hash``. fbgemm's CPU kernel
only supports ``readonly=True`` (lookups), so upstream MPZCH can only *train* on CUDA.

:class:`MPZCHModule` keeps everything upstream does (bucketing, input mapping, eviction scoring,
sharding) and changes one thing: on CPU, when the module inserts (``readonly=False``), it calls
rayrec's insert kernel (:func:`embeddings.kernel.zero_collision_hash_insert`), which writes the
identity/metadata tensors exactly as fbgemm's CUDA kernel lays them out (see
``docs/mpzch.md``). Everything else (readonly lookups, CUDA) stays on fbgemm's kernels.

Sharding rebuilds managed-collision modules with ``self.__class__``, so this subclass survives
``DistributedModelParallel`` and every rank calls the override for its own buckets.

Notation: N = number of ids in the batch for one table; S = rows of the table on this rank.

Example::

    module = MPZCHModule(zch_size=1024, device=torch.device("cpu"), total_num_buckets=4,
                         max_probe=16, name="item")
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torchrec.modules.hash_mc_modules import HashZchManagedCollisionModule
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embeddings.eviction import optimizer_states, reset_rows_, table_init_fn
from embeddings.kernel import InsertCounts, zero_collision_hash_insert
from embeddings.stats import TableStats


class MPZCHModule(HashZchManagedCollisionModule):
    """A :class:`HashZchManagedCollisionModule` whose CPU inserts run rayrec's kernel.

    It also keeps per-table counters (:class:`embeddings.stats.TableStats`: ids seen, inserts,
    hits, fallbacks, evictions, occupancy) that training jobs report each step. They are updated
    from the kernel's report of each call (``counters``), so a call costs O(N) whatever S is.

    Args:
        clock_hour: the hour TTL and LRU eviction take as "now" (None: the wall clock, as
            upstream's scorer reads it, ``time.time() // 3600``). Why a pinned hour: a replay or
            simulation of past traffic (the churn benchmark trains simulated days in minutes)
            must age ids by the data's time, not the machine's. Inserts then stamp ids with
            ``clock_hour + TTL`` and evict rows whose stamp is below ``clock_hour``. Every other
            argument is upstream's ``HashZchManagedCollisionModule``'s.
    """

    def __init__(self, *args: Any, clock_hour: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock_hour = clock_hour

    def rebuild_with_output_id_range(  # type: ignore[override]
        self, output_id_range: Tuple[int, int], output_segments: Optional[list] = None,
        device: Optional[torch.device] = None,
    ) -> "MPZCHModule":
        """Upstream's rebuild (sharding makes one module per rank's row range) keeping the clock."""
        module = super().rebuild_with_output_id_range(output_id_range, output_segments, device)
        module.clock_hour = self.clock_hour
        return module

    def _zero_collision_hash(  # type: ignore[override]
        self,
        input: torch.Tensor,
        identities: torch.Tensor,
        max_probe: int,
        circular_probe: bool,
        exp_hours: int,
        readonly: bool,
        local_sizes: Optional[torch.Tensor],
        offsets: Optional[torch.Tensor],
        metadata: Optional[torch.Tensor],
        output_on_uvm: bool,
        disable_fallback: bool,
        _modulo_identity_DPRECATED: bool,
        input_metadata: Optional[torch.Tensor],
        eviction_threshold: int,
        eviction_policy: int,
        opt_in_prob: int,
        num_reserved_slots: int,
        opt_in_rands: Optional[torch.Tensor],
        runtime_meta: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.clock_hour is not None and eviction_threshold >= 0 and input_metadata is not None:
            # upstream stamped input_metadata = wall hour + TTL and set the threshold to the wall
            # hour (ttl / lru scorers): move both onto the pinned clock
            input_metadata = input_metadata + (self.clock_hour - eviction_threshold)
            eviction_threshold = self.clock_hour
        kwargs = dict(
            input=input,
            identities=identities,
            max_probe=max_probe,
            circular_probe=circular_probe,
            exp_hours=exp_hours,
            readonly=readonly,
            local_sizes=local_sizes,
            offsets=offsets,
            metadata=metadata,
            output_on_uvm=output_on_uvm,
            disable_fallback=disable_fallback,
            _modulo_identity_DPRECATED=_modulo_identity_DPRECATED,
            input_metadata=input_metadata,
            eviction_threshold=eviction_threshold,
            eviction_policy=eviction_policy,
            opt_in_prob=opt_in_prob,
            num_reserved_slots=num_reserved_slots,
            opt_in_rands=opt_in_rands,
            runtime_meta=runtime_meta,
        )
        if readonly or identities.device.type != "cpu":
            # Lookups everywhere, and inserts on CUDA: upstream's kernels.
            return torch.ops.fbgemm.zero_collision_hash(**kwargs)

        stats = self.table_stats()
        if not stats.enabled:
            return zero_collision_hash_insert(**kwargs)
        # O(batch) accounting: the kernel reports what it did; no table scan, no clone.
        stats.before_insert(identities)
        counters = InsertCounts.buffer()
        slots, evicted = zero_collision_hash_insert(**kwargs, counters=counters)
        counts = InsertCounts.read(counters)
        stats.record_insert(
            num_ids=int(input.numel()),
            counts=counts,
            evicted_rows=0 if evicted is None else int(evicted.numel()),
            identities=identities,
        )
        if counts.evictions:
            # metadata is an expiry hour (last seen + TTL): age since last seen = now - expiry + TTL
            ttl = getattr(self._eviction_config, "single_ttl", None) or 0
            stats.record_eviction_ages(
                counts.evictions * (eviction_threshold + ttl) - counts.evicted_expiry_sum
            )
        return slots, evicted

    def table_stats(self) -> TableStats:
        """Counters for this table on this rank (created on first use)."""
        stats = self.__dict__.get("_rayrec_stats")
        if stats is None:
            stats = TableStats(name=self._name or "table")
            self.__dict__["_rayrec_stats"] = stats
        return stats


class MPZCHEmbeddingCollection(ManagedCollisionEmbeddingCollection):
    """A managed-collision embedding collection whose evictions reset the reassigned rows.

    Why: upstream's unsharded ``ManagedCollisionEmbeddingCollection`` calls a stub on eviction,
    so a new id inherits the evicted id's vector and optimizer state. Here the rows are reset
    after the remap and *before* the lookup, so the new id's first lookup already sees its
    fresh row, drawn from the table's configured initialisation (``init_fn``). (The sharded
    counterpart is ``embeddings.sharding.ShardedMPZCHEmbeddingCollection``.)
    """

    def forward(
        self, features: KeyedJaggedTensor, mutate_miss_lengths: bool = True
    ) -> Tuple[Dict[str, JaggedTensor], Optional[KeyedJaggedTensor]]:
        features = self._managed_collision_collection(features, mutate_miss_lengths=mutate_miss_lengths)
        configs = {c.name: c for c in self._embedding_module.embedding_configs()}
        for table, rows in self._managed_collision_collection.evict().items():
            if rows is None or rows.numel() == 0:
                continue
            weight = self._embedding_module.embeddings[table].weight
            reset_rows_(weight.data, rows, table_init_fn(configs[table]), optimizer_states(weight))
        embeddings = self._embedding_module(features)
        return embeddings, (features if self._return_remapped_features else None)
