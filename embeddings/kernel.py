"""The MPZCH insert kernel on CPU: ``torch.ops.rayrec.zero_collision_hash``.

Why: fbgemm 1.8 ships multi-probe zero-collision hashing (MPZCH) inserts only as a CUDA
kernel; its CPU kernel is readonly. TorchRec's ``HashZchManagedCollisionModule`` makes exactly
one kernel call, ``_zero_collision_hash(...)``, with fbgemm's argument list.
:func:`zero_collision_hash_insert` takes that same argument list and returns the same
``(slots, evict_slots)`` pair, so ``embeddings/mpzch.py`` forwards its arguments unchanged on
CPU, and a table it fills is read slot for slot by ``torch.ops.fbgemm.zero_collision_hash(...,
readonly=True)`` on CPU or CUDA.

What one call does (``embeddings/csrc/zch_insert.cpp``), for each ID in input order:

* window: ``modulo = local_sizes[i]`` (else the table size), ``offset = offsets[i]`` (else 0),
  ``block = modulo - num_reserved_slots`` under opt-in admission, else ``modulo``;
* probe ``murmur3(id) % block``, then ``+1`` circularly inside the block, ``max_probe`` slots:
  claim the first slot that is empty (-1) or already holds the ID; on a claim,
  ``metadata = max(old, input_metadata[i] or the current hour)``;
* eviction (when not readonly and ``eviction_threshold > 0`` or ``eviction_policy > 0``):
  policy 0 (single / per-feature TTL, metadata is an expiry hour) takes the first slot whose
  metadata is below the threshold and below the incoming value, if the ID is not already in
  its window; policy 1 (LRU) takes, after a full window with nothing free, the expired slot
  with the smallest metadata. Evicted slots come back in ``evict_slots`` (unique, sorted);
* opt-in: a new ID with ``opt_in_rands[i] >= opt_in_prob`` goes to the reserved slot
  ``block + hash % num_reserved_slots`` without owning it;
* no claim: the first probe slot ``hash % modulo + offset`` (shared, a collision), or -1 with
  ``disable_fallback``.

IDs are inserted in input order, so the result is deterministic; where two new IDs of one
batch compete for a slot the earlier one wins, one of the outcomes CUDA's race allows. Batches
of 1,024 IDs or more with per-ID windows (``local_sizes``/``offsets``, TorchRec's buckets) are
split into ranges of whole buckets that run on up to ``torch.get_num_threads()`` threads, each
range's IDs in input order, which gives bit for bit the single-thread result
(``embeddings/csrc/zch_partition.h``). Threads only pay off on cores of their own: the training
jobs set ``torch.set_num_threads(cpus_per_worker)``, the CPUs Ray reserved for the worker.
``identities``, ``metadata`` and ``runtime_meta`` are updated in place, like fbgemm.

One argument beyond fbgemm's, ``counters`` (an int64 ``[5]`` tensor, see :class:`InsertCounts`),
receives what the call did, so callers can keep table statistics without scanning the table.

Shapes: input ``[B]`` int64 (or int32), identities ``[N, 1]`` int64 (or int32 holding
``id % INT32_MAX``), metadata ``[N, 1]`` int32, runtime_meta ``[N, 1]`` int64, local_sizes /
offsets ``[B]`` int64, input_metadata / opt_in_rands ``[B]`` int32. Returns slots ``[B]`` int64
and evict_slots ``[E]`` int64 (None when eviction is off, as fbgemm returns).

Example:
    >>> identities = torch.full((1000, 1), -1, dtype=torch.int64)  # = fbgemm's create_zch_buffer
    >>> slots, _ = zero_collision_hash_insert(torch.tensor([7, -3, 2**62]), identities,
    ...                                       max_probe=128, circular_probe=True)
    >>> bool((identities[slots, 0] == torch.tensor([7, -3, 2**62])).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from embeddings.csrc import build

__all__ = ["InsertCounts", "zero_collision_hash_insert", "load_library"]

_OP_NAME = "rayrec::zero_collision_hash"
_loaded = False


@dataclass(frozen=True)
class InsertCounts:
    """What one insert call did, decoded from its ``counters`` tensor.

    Args:
        new_rows: empty rows the call claimed (occupancy grows by this much).
        owned: IDs (with repeats) holding their own slot after their insert: hits, claims of
            empty rows and evictions; the rest fell back to a shared slot.
        evictions: eviction events (a row can only be evicted twice in one call if a TTL is
            negative, so this equals ``evict_slots.numel()`` under TorchRec's scorers).
        evicted_expiry_sum: sum over evictions of the row's metadata (an expiry hour under TTL
            and LRU scoring) just before it was evicted.
        parts: bucket ranges the batch ran in (threads used, at most); 1 is one sequential pass.
    """

    new_rows: int
    owned: int
    evictions: int
    evicted_expiry_sum: int
    parts: int

    SIZE = 5

    @staticmethod
    def buffer() -> torch.Tensor:
        """A ``counters`` tensor to pass to one call ``[5]`` int64."""
        return torch.zeros(InsertCounts.SIZE, dtype=torch.int64)

    @classmethod
    def read(cls, counters: torch.Tensor) -> "InsertCounts":
        return cls(*counters.tolist())


def load_library() -> None:
    """Build (first time only, ~10 s) and load the op library; idempotent."""
    global _loaded
    if _loaded:
        return
    if not hasattr(torch.ops.rayrec, "zero_collision_hash"):
        torch.ops.load_library(str(build.build()))
    _register_fake()
    _loaded = True


def _register_fake() -> None:
    """Shape rules for FakeTensor / meta tracing (torch.compile, export).

    The slots have the input's length; how many slots get evicted is data-dependent, so
    ``evict_slots`` gets an unbacked size. Eviction is on under the same rule the kernel uses.
    """

    @torch.library.register_fake(_OP_NAME)
    def _(
        input: torch.Tensor,
        identities: torch.Tensor,
        max_probe: int,
        circular_probe: bool = False,
        exp_hours: int = -1,
        readonly: bool = False,
        local_sizes: Optional[torch.Tensor] = None,
        offsets: Optional[torch.Tensor] = None,
        metadata: Optional[torch.Tensor] = None,
        output_on_uvm: bool = False,
        disable_fallback: bool = False,
        _modulo_identity_DPRECATED: bool = False,
        input_metadata: Optional[torch.Tensor] = None,
        eviction_threshold: int = -1,
        eviction_policy: int = 0,
        opt_in_prob: int = -1,
        num_reserved_slots: int = -1,
        opt_in_rands: Optional[torch.Tensor] = None,
        runtime_meta: Optional[torch.Tensor] = None,
        counters: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        slots = input.new_empty(input.shape, dtype=torch.int64)
        support_evict = not readonly and (
            eviction_threshold > 0 or eviction_policy > 0 or exp_hours > 0
        )
        if not support_evict:
            return slots, None
        num_evicted = torch.library.get_ctx().new_dynamic_size()
        return slots, input.new_empty((num_evicted,), dtype=torch.int64)


def zero_collision_hash_insert(
    input: torch.Tensor,
    identities: torch.Tensor,
    max_probe: int,
    circular_probe: bool = False,
    exp_hours: int = -1,
    readonly: bool = False,
    local_sizes: Optional[torch.Tensor] = None,
    offsets: Optional[torch.Tensor] = None,
    metadata: Optional[torch.Tensor] = None,
    output_on_uvm: bool = False,
    disable_fallback: bool = False,
    _modulo_identity_DPRECATED: bool = False,
    input_metadata: Optional[torch.Tensor] = None,
    eviction_threshold: int = -1,
    eviction_policy: int = 0,
    opt_in_prob: int = -1,
    num_reserved_slots: int = -1,
    opt_in_rands: Optional[torch.Tensor] = None,
    runtime_meta: Optional[torch.Tensor] = None,
    counters: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fbgemm's ``zero_collision_hash`` on CPU, inserts included (see the module docstring).

    Same parameters, defaults and return values as ``torch.ops.fbgemm.zero_collision_hash``
    (fbgemm 1.8), so ``HashZchManagedCollisionModule._zero_collision_hash`` can forward its
    keyword arguments as they are. ``readonly=True`` is a lookup equal to fbgemm's CPU kernel.
    ``counters`` (from :meth:`InsertCounts.buffer`) is overwritten with what the call did.

    Returns:
        ``(slots [B] int64, evict_slots [E] int64 or None)``.
    """
    load_library()
    return torch.ops.rayrec.zero_collision_hash(
        input,
        identities,
        max_probe,
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
        counters=counters,
    )


load_library()
