"""MPZCH CPU kernel against a slow sequential Python model of fbgemm's CUDA insert kernel
(``_model_insert``) on random small cases, and the custom op under opcheck, FX and torch.compile.
"""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
import torch

from embeddings.hashing import unsigned_mod
from embeddings.kernel import zero_collision_hash_insert
from tests.embeddings.hash_oracle import random_ids, reference_murmur
from tests.embeddings.kernel_tables import buffers, insert, probe_window


# --------------------------------------------------------------------------------------------
# a sequential model of the CUDA kernel, against random small cases


def _model_insert(ids, identities, metadata, max_probe, sizes, offs, incoming, threshold, policy,
                  prob, reserved, rands, disable_fallback):
    """Plain-Python, one-ID-at-a-time reading of fbgemm's CUDA insert kernel (lists mutated)."""
    support_evict = metadata is not None
    out, evicted = [], []
    for i, raw in enumerate(ids):
        modulo, offset = sizes[i], offs[i]
        block = modulo - reserved if prob != -1 else modulo
        h = reference_murmur(raw)
        start, value = h % block, incoming[i]
        reserved_slot = block + h % reserved if prob != -1 else None
        window = probe_window(start, offset, block, max_probe)
        present = False
        for slot in window:
            if identities[slot] == -1:
                break
            if identities[slot] == raw:
                present = True
                break
        if not present and rands is not None and rands[i] >= prob:
            if support_evict:
                metadata[reserved_slot + offset] = max(metadata[reserved_slot + offset], value)
            out.append(reserved_slot + offset)
            continue
        claimed, lru = None, None
        for slot in window:
            if identities[slot] in (-1, raw):
                identities[slot] = raw
                if support_evict:
                    metadata[slot] = max(metadata[slot], value)
                claimed = slot
                break
            if support_evict:
                seen = metadata[slot]
                expired = threshold > seen and seen < value
                if policy == 0 and not present and expired:
                    identities[slot], metadata[slot] = raw, max(seen, value)
                    evicted.append(slot)
                    claimed = slot
                    break
                if policy == 1 and expired and (lru is None or seen < metadata[lru]):
                    lru = slot
        if claimed is None and lru is not None:
            identities[lru], metadata[lru] = raw, max(metadata[lru], value)
            evicted.append(lru)
            claimed = lru
        if claimed is None:
            if disable_fallback:
                claimed = -1
            else:
                claimed = (reserved_slot if prob != -1 else h % modulo) + offset
        out.append(claimed)
    return out, sorted(set(evicted))


@settings(max_examples=60, deadline=None, database=None)
@given(
    data=st.data(),
    policy=st.sampled_from([None, 0, 1]),
    buckets=st.sampled_from([1, 2, 4]),
    opt_in=st.sampled_from([None, 100, 60]),
    disable_fallback=st.booleans(),
)
def test_kernel_matches_a_sequential_model_on_random_tables(data, policy, buckets, opt_in, disable_fallback) -> None:
    bucket_rows = data.draw(st.integers(6, 12))
    rows = buckets * bucket_rows
    max_probe = data.draw(st.integers(1, bucket_rows + 2))
    pool = data.draw(st.lists(st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != -1), min_size=1, max_size=40))
    rounds = data.draw(st.integers(1, 3))
    reserved = 2 if opt_in is not None else -1
    prob = opt_in if opt_in is not None else -1

    identities = torch.full((rows, 1), -1, dtype=torch.int64)
    metadata = torch.full((rows, 1), -1, dtype=torch.int32) if policy is not None else None
    model_ids = identities[:, 0].tolist()
    model_meta = metadata[:, 0].tolist() if metadata is not None else None
    for hour in range(rounds):
        batch = data.draw(st.lists(st.sampled_from(pool), min_size=0, max_size=30))
        ids = torch.tensor(batch, dtype=torch.int64)
        bucket = unsigned_mod(ids, buckets)
        sizes, offs = [bucket_rows] * len(batch), (bucket * bucket_rows).tolist()
        incoming = data.draw(st.lists(st.integers(0, 40), min_size=len(batch), max_size=len(batch)))
        threshold = data.draw(st.integers(1, 30)) if policy is not None else -1
        rands = (data.draw(st.lists(st.integers(0, 99), min_size=len(batch), max_size=len(batch)))
                 if prob not in (-1, 100) else None)
        kwargs = dict(
            local_sizes=torch.tensor(sizes, dtype=torch.int64), offsets=torch.tensor(offs, dtype=torch.int64),
            disable_fallback=disable_fallback, opt_in_prob=prob, num_reserved_slots=reserved,
            opt_in_rands=torch.tensor(rands, dtype=torch.int32) if rands is not None else None,
        )
        if policy is not None:
            kwargs.update(metadata=metadata, input_metadata=torch.tensor(incoming, dtype=torch.int32),
                          eviction_threshold=threshold, eviction_policy=policy)
        slots, evicted = insert(ids, identities, max_probe, **kwargs)
        expected, expected_evicted = _model_insert(
            batch, model_ids, model_meta, max_probe, sizes, offs, incoming, threshold,
            policy if policy is not None else 0, prob, reserved if prob != -1 else 1, rands, disable_fallback,
        )
        assert slots.tolist() == expected
        assert identities[:, 0].tolist() == model_ids
        if policy is not None:
            assert metadata[:, 0].tolist() == model_meta
            assert evicted.tolist() == expected_evicted
        else:
            assert evicted is None
        occupied = identities[identities[:, 0] != -1, 0]
        assert occupied.numel() == torch.unique(occupied).numel()


# --------------------------------------------------------------------------------------------
# the custom op under tracing and compilation


def test_op_passes_opcheck_with_and_without_eviction() -> None:
    op = torch.ops.rayrec.zero_collision_hash.default
    ids = random_ids(64, seed=19)
    identities, _ = buffers(128)
    torch.library.opcheck(op, (ids, identities, 8), dict(circular_probe=True))
    identities, metadata = buffers(128, evict=True)
    torch.library.opcheck(
        op, (ids, identities, 8),
        dict(circular_probe=True, metadata=metadata, eviction_threshold=10, eviction_policy=1,
             input_metadata=torch.full((ids.numel(),), 20, dtype=torch.int32)),
    )


def test_op_under_fx_trace_and_torch_compile() -> None:
    def remap(ids: torch.Tensor, identities: torch.Tensor) -> torch.Tensor:
        slots, _ = zero_collision_hash_insert(ids, identities, 8, circular_probe=True)
        return slots + 1

    ids = random_ids(50, seed=20)
    eager_table, _ = buffers(100)
    expected = remap(ids, eager_table)

    graph = torch.fx.symbolic_trace(remap)
    assert "rayrec.zero_collision_hash" in graph.code
    traced_table, _ = buffers(100)
    assert torch.equal(graph(ids, traced_table), expected)
    assert torch.equal(traced_table, eager_table)

    compiled = torch.compile(remap, backend="aot_eager", fullgraph=True)
    compiled_table, _ = buffers(100)
    assert torch.equal(compiled(ids, compiled_table), expected)
    assert torch.equal(compiled_table, eager_table)  # the in-place write survives functionalization


def test_library_build_is_cached_and_keyed_by_source(tmp_path) -> None:
    from embeddings.csrc import build

    cached = build.library_path()
    assert cached.exists()  # importing embeddings.kernel built (or found) it
    built_at = cached.stat().st_mtime_ns
    assert build.build() == cached
    assert cached.stat().st_mtime_ns == built_at  # found, not recompiled
    changed = tmp_path / "zch_insert.cpp"
    changed.write_text(build.SOURCE.read_text() + "\n// changed\n")
    assert build.library_path(changed) != cached
