"""Per-table MPZCH counters: what a training job reports about its hash tables each step.

Why our own: TorchRec's ``ScalarLogger`` writes to TensorBoard on a fixed cadence and only when
``tb_logging_frequency`` is set; rayrec reports through ``ray.train.report`` and the run
folder's ``metrics.jsonl``, so the counters live in plain Python ints that a job can read and
reset per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class TableStats:
    """Counters for one MPZCH table on one rank since the last :meth:`snapshot` reset.

    Args:
        name: table name, used as the metric prefix.
        enabled: when False, :meth:`record_insert` is never called (no extra scans).
    """

    name: str
    enabled: bool = True
    ids: int = 0
    hits: int = 0
    inserts: int = 0
    fallbacks: int = 0
    evictions: int = 0
    eviction_age_hours: float = 0.0
    occupied: int = 0
    rows: int = 0
    _steps: int = field(default=0, repr=False)

    def record_insert(
        self,
        input: torch.Tensor,
        slots: torch.Tensor,
        identities: torch.Tensor,
        new_rows: int,
        evicted: Optional[torch.Tensor],
    ) -> None:
        """Account one insert call.

        Args:
            input: raw ids [N] int64.
            slots: rows returned by the kernel [N] (-1 when fallback is disabled and no row).
            identities: the table's identity tensor [S, 1] after the call.
            new_rows: empty rows claimed by this call.
            evicted: rows whose previous id was evicted [E] or None.
        """
        n = int(input.numel())
        n_evicted = 0 if evicted is None else int(evicted.numel())
        if n:
            valid = slots >= 0
            owner = torch.full_like(input, -1)
            owner[valid] = identities.view(-1)[slots[valid]].to(input.dtype)
            resolved = int((owner == input).sum())
        else:
            resolved = 0
        inserts = new_rows + n_evicted
        self.ids += n
        self.inserts += inserts
        self.hits += max(resolved - inserts, 0)
        self.fallbacks += n - resolved
        self.evictions += n_evicted
        self.rows = int(identities.shape[0])
        self.occupied = int((identities != -1).sum())
        self._steps += 1

    def record_eviction_ages(self, ages_hours: torch.Tensor) -> None:
        """Hours since each evicted id was last seen [E] (summed; averaged in :meth:`snapshot`)."""
        self.eviction_age_hours += float(ages_hours.sum())

    def snapshot(self, reset: bool = True) -> dict[str, float]:
        """Metrics named ``mpzch/<table>/<counter>``; resets the per-step counters.

        The mean eviction age is ``eviction_age_hours_sum / evictions`` (sums add across ranks).
        """
        p = f"mpzch/{self.name}"
        out = {
            f"{p}/ids": self.ids,
            f"{p}/hits": self.hits,
            f"{p}/inserts": self.inserts,
            f"{p}/fallbacks": self.fallbacks,
            f"{p}/evictions": self.evictions,
            f"{p}/occupancy": self.occupied / self.rows if self.rows else 0.0,
            f"{p}/eviction_age_hours_sum": self.eviction_age_hours,
        }
        if reset:
            self.ids = self.hits = self.inserts = self.fallbacks = self.evictions = 0
            self.eviction_age_hours = 0.0
        return out
