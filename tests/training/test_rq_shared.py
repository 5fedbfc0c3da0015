"""The shared residual-coding and seen-item pieces behave as every caller assumes."""

from __future__ import annotations

import torch

from training.models.rq import ResidualQuantizer, greedy_encode, path_keys
from training.retrieval.exclude import excluded_positions


def test_greedy_encode_picks_the_nearest_codeword_of_each_residual():
    g = torch.Generator().manual_seed(0)
    codebooks = torch.randn(3, 8, 4, generator=g)
    x = torch.randn(50, 4, generator=g)
    codes, inputs = greedy_encode(x, codebooks)
    assert codes.shape == (50, 3) and inputs.shape == (3, 50, 4)
    residual = x.clone()
    for level in range(3):
        brute = torch.cdist(residual, codebooks[level]).argmin(dim=1)
        assert torch.equal(codes[:, level], brute)
        assert torch.allclose(inputs[level], residual)
        residual = residual - codebooks[level][brute]
    rq = ResidualQuantizer(dim=4, levels=3, codes=8)
    rq.codebooks.copy_(codebooks)
    assert torch.equal(rq.encode(x), codes)  # the quantizer codes through the same function


def test_path_keys_order_paths_lexicographically_and_prefixes_number_nodes():
    codes = torch.tensor([[1, 0, 3], [0, 3, 3], [1, 0, 0], [0, 0, 1]])
    keys = path_keys(codes, 4)
    assert keys.tolist() == [1 * 16 + 0 * 4 + 3, 0 * 16 + 3 * 4 + 3, 16, 1]
    assert torch.argsort(keys).tolist() == [3, 1, 2, 0]  # lexicographic order of the paths
    assert path_keys(codes[:, :1], 4).tolist() == [1, 0, 1, 0]


def test_excluded_positions_drop_unknown_ids_and_keep_users_apart():
    sorted_ids = torch.tensor([3, 7, 42, 100])
    users, pos = excluded_positions([torch.tensor([42, 5]), torch.tensor([], dtype=torch.int64), torch.tensor([[3], [100]])], sorted_ids)
    assert list(zip(users.tolist(), pos.tolist())) == [(0, 2), (2, 0), (2, 3)]
    assert excluded_positions(None, sorted_ids)[0].numel() == 0
    assert excluded_positions([torch.tensor([1])], torch.empty(0, dtype=torch.int64))[0].numel() == 0
    # an id past the largest is dropped, not clamped onto the last item
    assert excluded_positions([torch.tensor([1000])], sorted_ids)[0].numel() == 0
