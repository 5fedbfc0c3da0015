"""Table builders shared by the MPZCH kernel tests (test_kernel*.py).

``insert`` is rayrec's CPU insert; ``fbgemm_lookup`` is fbgemm's readonly CPU kernel, the
layout oracle: whatever rayrec inserts, fbgemm must find at the slot rayrec returned.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch

from embeddings.hashing import first_probe_slot
from embeddings.kernel import zero_collision_hash_insert
from tests.embeddings.hash_oracle import random_ids


def buffers(rows: int, evict: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    identities, metadata = torch.ops.fbgemm.create_zch_buffer(rows, support_evict=evict, long_type=True)
    return identities, (metadata if evict else None)


def insert(ids: torch.Tensor, identities: torch.Tensor, max_probe: int, **kwargs):
    return zero_collision_hash_insert(ids, identities, max_probe, circular_probe=True, **kwargs)


def fbgemm_lookup(ids: torch.Tensor, identities: torch.Tensor, max_probe: int, **kwargs) -> torch.Tensor:
    slots, _ = torch.ops.fbgemm.zero_collision_hash(
        ids, identities, max_probe, circular_probe=True, readonly=True, **kwargs
    )
    return slots


def probe_window(start: int, offset: int, block: int, max_probe: int) -> list[int]:
    return [offset + (start + p) % block for p in range(max_probe)]


def colliding_ids(rows: int, count: int, seed: int) -> torch.Tensor:
    """IDs whose first probe slot is 0, so with max_probe=rows they walk the table in order."""
    ids = random_ids(count * rows * 3, seed=seed)
    return ids[first_probe_slot(ids, rows) == 0][:count]
