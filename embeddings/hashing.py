"""MurmurHash3 x64 of raw IDs, vectorised in torch, bit for bit with fbgemm's MPZCH hash.

Why this exists: fbgemm places an ID's first probe slot at ``murmur3(id) % block``, and its
Python entry point ``torch.ops.fbgemm.murmur_hash3`` hashes one scalar at a time and raises for
hashes >= 2**63. Benchmarks, tests and bucket statistics need the hash of millions of IDs at
once, with the full 64-bit result.

torch has no full uint64 arithmetic, so the hash runs on int64 tensors that hold the uint64 bit
pattern: multiplication and addition wrap modulo 2**64 exactly as uint64 does, left shifts drop
bits the same way, and the one thing that differs, right shift, is made logical by masking the
sign-extended bits. A hash >= 2**63 comes back as a negative int64 with the same bits;
:func:`unsigned_mod` turns such values into the slot fbgemm computes.

Shapes: every function maps an int64 tensor of any shape ``[*]`` to an int64 tensor ``[*]``.

Example:
    >>> ids = torch.tensor([0, 1, -1, 2**62], dtype=torch.int64)
    >>> slots = unsigned_mod(murmur_hash3(ids), 1_000_000)   # fbgemm's first probe slots
"""

from __future__ import annotations

import torch

__all__ = ["murmur_hash3", "unsigned_mod", "first_probe_slot"]


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch scalars must fit int64)."""
    return value - (1 << 64) if value >= (1 << 63) else value


_C1 = _signed(0x87C37B91114253D5)
_C2 = _signed(0x4CF5AD432745937F)
_FMIX1 = _signed(0xFF51AFD7ED558CCD)
_FMIX2 = _signed(0xC4CEB9FE1A85EC53)
_INT64_MAX = (1 << 63) - 1


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (uint64) right shift of int64 bit patterns: drop the sign-extended high bits."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _rotate_left(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x << bits) | _shift_right(x, 64 - bits)


def _final_mix(k: torch.Tensor) -> torch.Tensor:
    k = k ^ _shift_right(k, 33)
    k = k * _FMIX1
    k = k ^ _shift_right(k, 33)
    k = k * _FMIX2
    return k ^ _shift_right(k, 33)


def murmur_hash3(ids: torch.Tensor) -> torch.Tensor:
    """fbgemm's ``murmur_hash3_2x64(uint64(id), 0, 0)`` for every ID: ``[*]`` int64 → ``[*]``.

    The ID is read as uint64, so negative IDs hash as their two's complement. The result holds
    the uint64 hash's bits (negative where the hash is >= 2**63).

    The second 64-bit block and the seed are 0, so the second lane's body reduces to
    ``h2 = h1 * 5 + 0x38495ab5``: that is the only shortcut taken against the reference.
    """
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"murmur_hash3 takes int64 or int32 IDs, got {ids.dtype}")
    k1 = ids.to(torch.int64) * _C1
    k1 = _rotate_left(k1, 31) * _C2
    h1 = _rotate_left(k1, 27) * 5 + 0x52DCE729
    h2 = h1 * 5 + 0x38495AB5
    h1 = h1 ^ 16  # length in bytes
    h2 = h2 ^ 16
    h1 = h1 + h2
    h2 = h2 + h1
    h1 = _final_mix(h1)
    h2 = _final_mix(h2)
    h1 = h1 + h2
    h2 = h2 + h1
    return h1 ^ h2


def unsigned_mod(hashes: torch.Tensor, modulo: int | torch.Tensor) -> torch.Tensor:
    """``uint64(hash) % modulo`` for int64 bit patterns, ``modulo`` in [1, 2**63).

    A negative pattern stands for ``low63 + 2**63``; its remainder is assembled from the two
    parts with :func:`_add_mod`, so nothing overflows int64 even for moduli near 2**63.
    """
    low = (hashes & _INT64_MAX) % modulo
    two_62 = (1 << 62) % modulo
    two_63 = _add_mod(two_62, two_62, modulo)
    return torch.where(hashes < 0, _add_mod(low, two_63, modulo), low)


def _add_mod(
    a: int | torch.Tensor, b: int | torch.Tensor, modulo: int | torch.Tensor
) -> int | torch.Tensor:
    """``(a + b) % modulo`` for ``0 <= a, b < modulo < 2**63`` without forming ``a + b``."""
    gap = modulo - b
    if isinstance(a, int) and isinstance(gap, int):
        return a - gap if a >= gap else a + b
    return torch.where(a >= gap, a - gap, a + b)


def first_probe_slot(
    ids: torch.Tensor,
    num_rows: int,
    local_sizes: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The global slot fbgemm probes first for each ID (and its no-eviction fallback slot).

    ``hash % local_size + offset`` when the table is split into buckets, else
    ``hash % num_rows``. ``[B]`` → ``[B]`` int64.
    """
    hashes = murmur_hash3(ids)
    if local_sizes is None:
        return unsigned_mod(hashes, num_rows)
    assert offsets is not None, "local_sizes and offsets come together"
    return unsigned_mod(hashes, local_sizes) + offsets
