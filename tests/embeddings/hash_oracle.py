"""Oracles shared by the MPZCH hash and kernel tests: distinct raw 64-bit ids of both signs, and
MurmurHash3 written from the algorithm's definition with Python ints, independent of
embeddings/hashing.py (the code under test)."""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1


def random_ids(count: int, seed: int) -> torch.Tensor:
    """Distinct raw 64-bit IDs, both signs (negative IDs hash as their two's complement)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(-(2**63), 2**63 - 1, (count * 2,), generator=generator)
    ids = torch.unique(ids)
    ids = ids[torch.randperm(ids.numel(), generator=generator)][:count]
    return ids[ids != -1]  # -1 marks an empty slot; a real ID never takes that value


def reference_murmur(x: int, y: int = 0, seed: int = 0) -> int:
    """MurmurHash3_x64_128 over the 16 bytes (x, y), folded h1 ^ h2, written from the
    algorithm's definition with Python ints (an oracle independent of embeddings/hashing.py)."""

    def rotl(v: int, r: int) -> int:
        return ((v << r) | (v >> (64 - r))) & MASK64

    def fmix(k: int) -> int:
        k ^= k >> 33
        k = (k * 0xFF51AFD7ED558CCD) & MASK64
        k ^= k >> 33
        k = (k * 0xC4CEB9FE1A85EC53) & MASK64
        return k ^ (k >> 33)

    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = seed
    k1 = rotl((x & MASK64) * c1 & MASK64, 31) * c2 & MASK64
    h1 = (rotl(h1 ^ k1, 27) + h2) & MASK64
    h1 = (h1 * 5 + 0x52DCE729) & MASK64
    k2 = rotl((y & MASK64) * c2 & MASK64, 33) * c1 & MASK64
    h2 = (rotl(h2 ^ k2, 31) + h1) & MASK64
    h2 = (h2 * 5 + 0x38495AB5) & MASK64
    h1 ^= 16
    h2 ^= 16
    h1 = (h1 + h2) & MASK64
    h2 = (h2 + h1) & MASK64
    h1, h2 = fmix(h1), fmix(h2)
    h1 = (h1 + h2) & MASK64
    h2 = (h2 + h1) & MASK64
    return h1 ^ h2


def as_uint64(value: int) -> int:
    return value & MASK64
