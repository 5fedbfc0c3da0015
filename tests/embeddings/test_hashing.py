"""Tests for the MPZCH hash (embeddings/hashing.py): MurmurHash3 over raw 64-bit ids against
fbgemm's op (where it does not overflow) and an independent reference, and the unsigned modulo
that turns a hash into a slot or bucket."""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import pytest
import torch

from embeddings.hashing import murmur_hash3, unsigned_mod
from tests.embeddings.hash_oracle import as_uint64, random_ids, reference_murmur


def test_murmur_matches_fbgemm_where_fbgemm_does_not_overflow() -> None:
    ids = torch.cat([random_ids(400, seed=1), torch.tensor([0, 1, 2**63 - 1, -(2**63), -2])])
    hashes = murmur_hash3(ids)
    compared = overflowed = 0
    for raw, ours in zip(ids.tolist(), hashes.tolist()):
        try:
            theirs = torch.ops.fbgemm.murmur_hash3(torch.tensor([raw]), 0, 0).item()
        except RuntimeError:
            overflowed += 1  # fbgemm cannot return a hash >= 2**63; ours keeps its bits
            assert ours < 0
            continue
        assert ours == theirs, raw
        compared += 1
    assert compared > 100 and overflowed > 100  # both halves of the uint64 range were hit


def test_murmur_matches_reference_values_including_high_hashes_and_negative_ids() -> None:
    ids = [0, 1, 7, -1, -(2**63), 2**63 - 1, 1234567890123456789, -987654321]
    ours = [as_uint64(h) for h in murmur_hash3(torch.tensor(ids)).tolist()]
    assert ours == [reference_murmur(x) for x in ids]
    assert any(h >= 2**63 for h in ours)
    # int32 IDs hash as their sign-extended int64 value, as fbgemm casts them.
    assert murmur_hash3(torch.tensor([-5, 9], dtype=torch.int32)).tolist() == murmur_hash3(
        torch.tensor([-5, 9])
    ).tolist()


def test_unsigned_mod_matches_python_ints() -> None:
    hashes = murmur_hash3(random_ids(300, seed=2))
    for modulo in (1, 3, 1000, 2**33 + 7, 2**62 + 1):
        expected = [as_uint64(h) % modulo for h in hashes.tolist()]
        assert unsigned_mod(hashes, modulo).tolist() == expected
        assert unsigned_mod(hashes, torch.full_like(hashes, modulo)).tolist() == expected


def test_murmur_rejects_float_ids() -> None:
    with pytest.raises(TypeError, match="int64 or int32"):
        murmur_hash3(torch.tensor([1.0]))
