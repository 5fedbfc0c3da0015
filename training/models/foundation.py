"""The foundation model (FM): a heavier user–item representation than the request path can afford.

A transformer encoder reads the user's history (item id rows with learned positions counted
from the newest, so position 1 is always the latest item whatever the history's length) together with a candidate token (the candidate's id row plus a projection of the
pair's dense features); the candidate token's output is the user–item embedding ``[B, D]``.
Every candidate needs its own pass over the whole history, so the FM costs several times the
ranker's FLOPs per pair (``docs/benchmarks/ranking.md`` has the numbers): serving precomputes it
(SOLARIS) and the ranker consumes it when the cache has it.

The FM learns from its own heads (one logit per ranker task) so its embedding means the same
thing whether the ranker uses it or not; the ranker reads the embedding detached
(:class:`training.models.ranker.RankerArch`), as a precomputed feature.

Notation: B rows, L history_len, E id-table dim, F dense features, D = ``dim``, T tasks.

Example::

    fm = FoundationModel(FoundationArchSpec(table_dim=32, dense_dim=10, history_len=50, num_tasks=3))
    emb, logits = fm(history_rows, history_offsets, candidate_rows, dense)   # [B, D], [B, T]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FoundationArchSpec:
    """Shape of the FM.

    Args:
        table_dim: id-table dim E (input rows).
        dense_dim: dense features F of a (user, item) pair.
        history_len: L, the longest history the positional table covers.
        num_tasks: T, heads trained on the ranker's labels.
        dim: model width D (also the output embedding width).
        layers / heads: transformer depth and attention heads.
    """

    table_dim: int
    dense_dim: int
    history_len: int
    num_tasks: int
    dim: int = 64
    layers: int = 2
    heads: int = 4


class FoundationModel(nn.Module):
    """Transformer over [candidate; history] tokens → user–item embedding (see module docstring).

    Args:
        spec: :class:`FoundationArchSpec`.
    """

    def __init__(self, spec: FoundationArchSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.item_in = nn.Linear(spec.table_dim, d)
        self.dense_in = nn.Linear(spec.dense_dim, d)
        self.position = nn.Embedding(spec.history_len + 1, d)  # 0: the candidate token
        layer = nn.TransformerEncoderLayer(d, spec.heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.heads = nn.Linear(d, spec.num_tasks)

    def forward(
        self, history_rows: torch.Tensor, history_offsets: torch.Tensor, candidate_rows: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed each (user history, candidate) pair.

        Args:
            history_rows: jagged history id rows ``[H, E]`` (oldest first per row, as the
                ``history`` feature is stored).
            history_offsets: ``[B + 1]`` row offsets into ``history_rows``.
            candidate_rows: ``[B, E]``.
            dense: ``[B, F]``.
        Returns:
            embedding ``[B, D]`` and task logits ``[B, T]``.
        """
        L = self.spec.history_len
        idx, lengths = newest_first_window(history_offsets, L)
        window = history_rows[idx]
        offsets = torch.zeros_like(history_offsets)
        offsets[1:] = torch.cumsum(lengths, 0)
        hist = torch.ops.fbgemm.jagged_to_padded_dense(window, [offsets], [L], 0.0)  # [B, L, E]
        tokens = torch.cat(
            [(self.item_in(candidate_rows) + self.dense_in(dense)).unsqueeze(1), self.item_in(hist)], dim=1
        )  # [B, 1 + L, D]
        tokens = tokens + self.position.weight.unsqueeze(0)
        pad = torch.arange(L + 1, device=lengths.device).unsqueeze(0) > lengths.unsqueeze(1)  # [B, 1 + L]
        out = self.encoder(tokens, src_key_padding_mask=pad)  # [B, 1 + L, D]
        emb = out[:, 0]  # [B, D] the candidate token
        return emb, self.heads(emb)


def newest_first_window(offsets: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which history rows the FM reads, newest first, so token 1 is every row's latest item
    (oldest-first tokens would put it at a position that moves with the history's length).

    Args:
        offsets: ``[B + 1]`` jagged offsets of oldest-first histories.
        limit: L, the most items kept per row (the newest ones).
    Returns:
        indices into the history values ``[sum lengths]`` and the kept lengths ``[B]``.

    Example: offsets ``[0, 5, 7]``, limit 3 → indices ``[4, 3, 2, 6, 5]``, lengths ``[3, 2]``.
    """
    lengths = (offsets[1:] - offsets[:-1]).clamp(max=limit)  # [B]
    newest = offsets[1:] - 1
    return torch.repeat_interleave(newest, lengths) - _ranks_within(lengths), lengths


def _ranks_within(lengths: torch.Tensor) -> torch.Tensor:
    """0..n-1 inside each run of ``lengths`` (``[B]`` → ``[sum lengths]``)."""
    total = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(total, device=lengths.device) - torch.repeat_interleave(starts, lengths)
