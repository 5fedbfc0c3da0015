"""A sequential user tower: causal self-attention over the time-ordered history (SASRec family).

Why SASRec (Kang & McAuley, ICDM 2018) and not HSTU (Zhai et al., ICML 2024) or BERT4Rec: the
question on ml-100k is whether the *order* of a history helps retrieval, and SASRec is the
smallest model that reads order (learned positions + causal attention, 2 blocks of width 64
train in seconds per epoch on CPU). HSTU's gains come from its pointwise-aggregated attention
with relative time buckets, built for actions interleaved with contexts at billions of events;
on 100k ratings it adds parameters without data to fit them, and its fused kernels are GPU
only. BERT4Rec's bidirectional cloze objective does not give the one vector per user that
a retriever's index searches. SASRec's last-position state does, so the tower drops into the
two-tower seam unchanged and the item side stays the MPZCH ``item`` table every retriever shares.

Data flow (notation: B batch rows, E table dim, T = ``max_len``, D output dim)::

    history rows (jagged [H, E], oldest first)
        → pad_history: the T most recent, left-aligned        x [B, T, E], mask [B, T]
        → + position embedding of each slot's recency (0 = most recent item)
        → dropout → ``blocks`` × pre-norm TransformerEncoderLayer, causal mask   [B, T, E]
        → LayerNorm → the state at each row's last item (slot n-1)               [B, E]
        → [user id row ‖ state] (``use_user_id``) → MLP                          [B, D]

All-position training (``train_positions: all``, :meth:`SequentialUserTower.every_position`)
runs the same blocks once and keeps the state at *every* real slot, ``[H, E]`` → MLP → ``[H, D]``:
slot t's state has read items 0..t only (causal), so it is the user vector a retriever would
serve after item t, and SASRec trains it to score item t+1. One forward trains all the prefixes
that ``last`` spends one example (one forward over up to T items) each on.

Causal: slot t attends to slots ≤ t only, so the state at slot t is a function of the first
t+1 items; with left alignment a row's real items never attend to its padding (which comes
after them), so no key-padding mask is needed and no row has an all-masked softmax (NaN). A
row with no history reads slot 0: a learned "no history" state from its position embedding.
Positions (``positions: recency``) count back from the most recent item, so the most recent
item always has the same position whatever the history length (SASRec's right-aligned absolute
positions, the same thing). ``positions: start`` counts from the oldest item the tower reads
(RecBole's SASRec): then slot t's state does not depend on how many items follow it, so under
all-position training the state trained at slot t is exactly the one served for the history
that ends at item t, while with ``recency`` the served slot (recency 0) is trained once a window.

Example::

    tower = build_sequential_tower(SequenceConfig(max_len=50), embedding_dim=64, hidden=[128], out_dim=64)
    user = tower(user_rows, history_rows)          # [B, E], JaggedTensor [H, E] → [B, 64]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor

from training.config import SequenceConfig
from training.models.towers import mlp, pad_history


class SlotPositions(nn.Embedding):
    """Learned position rows ``[T, E]`` for the slots of a left-aligned history.

    An ``nn.Embedding`` (so its state is the ``positions.weight`` older checkpoints hold) that
    also knows how slots are counted: from the most recent item (``from_start`` False, recency
    0 at a row's last item) or from the oldest (slot t is position t).
    """

    def __init__(self, max_len: int, dim: int, from_start: bool = False) -> None:
        super().__init__(max_len, dim)
        self.from_start = from_start

    def for_slots(self, lengths: torch.Tensor, t: int) -> torch.Tensor:
        """Position rows of T' = ``t`` slots for rows of real lengths ``[B]`` → ``[B, T', E]``."""
        slot = torch.arange(t, device=lengths.device).unsqueeze(0)  # [1, T']
        if self.from_start:
            return self(slot.expand(lengths.shape[0], t))
        return self((lengths.unsqueeze(1) - 1 - slot).clamp(min=0))  # 0 at the last real item


class SequentialUserTower(nn.Module):
    """Causal Transformer over the most recent ``T`` history rows; the last real slot's state.

    Args:
        blocks: ``nn.TransformerEncoder`` of pre-norm, batch-first layers of width E.
        positions: :class:`SlotPositions` ``(T, E)``, by recency (0 = most recent) or from the oldest item.
        head: ``[B, E]`` (or ``[B, 2E]`` with ``use_user_id``) → ``[B, D]``.
        dropout: on the input sum of item rows and positions.
        use_user_id: prepend the user's id row to the head's input.
    """

    def __init__(self, blocks: nn.TransformerEncoder, positions: SlotPositions, head: nn.Module,
                 dropout: float, use_user_id: bool) -> None:
        super().__init__()
        self.blocks = blocks
        self.positions = positions
        self.head = head
        self.input_dropout = nn.Dropout(dropout)
        self.final_norm = nn.LayerNorm(positions.embedding_dim)
        self.use_user_id = use_user_id

    @property
    def max_len(self) -> int:
        return self.positions.num_embeddings

    def sequence_states(self, history: JaggedTensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """States at every slot ``[B, T', E]`` and each row's real length ``[B]`` (≤ T).

        T' = min(T, longest row in the batch), at least 1: slots past every row's end change
        nothing (causal; positions by recency or from the start), so they are not computed.
        """
        longest = int(history.lengths().max()) if batch_size > 0 and history.lengths().numel() else 0
        t = max(1, min(self.max_len, longest))
        x, mask = pad_history(history, batch_size, t)  # [B, T', E], [B, T']
        lengths = mask.sum(dim=1)  # [B]
        x = self.input_dropout(x + self.positions.for_slots(lengths, t))  # [B, T', E]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=x.device, dtype=x.dtype)  # [T', T']
        states = self.final_norm(self.blocks(x, mask=causal, is_causal=True))  # [B, T', E]
        return states, lengths

    def forward(self, user_rows: torch.Tensor, history: JaggedTensor) -> torch.Tensor:
        """``user_rows`` ``[B, E]`` (the ``user_id`` rows), ``history`` jagged ``[H, E]`` → ``[B, D]``."""
        batch_size = user_rows.shape[0]
        states, lengths = self.sequence_states(history, batch_size)
        last = (lengths - 1).clamp(min=0)  # [B]
        state = states[torch.arange(batch_size, device=states.device), last]  # [B, E]
        return self._head(user_rows, state)

    def every_position(self, user_rows: torch.Tensor, history: JaggedTensor) -> torch.Tensor:
        """The user vector after each history item: jagged ``[H, E]`` → ``[H, D]``, row h the
        output at item h's slot (same order as ``history.values()``).

        Rows must hold at most T items (the windows of ``build_sequence_examples``): a longer
        row's oldest items would be cut and its outputs no longer line up with its targets.
        """
        batch_size = user_rows.shape[0]
        if history.lengths().numel() and int(history.lengths().max()) > self.max_len:
            raise ValueError(f"every_position: a history row is longer than max_len={self.max_len}")
        states, lengths = self.sequence_states(history, batch_size)  # [B, T', E], [B]
        real = torch.arange(states.shape[1], device=states.device).unsqueeze(0) < lengths.unsqueeze(1)  # [B, T']
        state = states[real]  # [H, E], row-major: each row's slots in order, as the jagged values
        rows = torch.repeat_interleave(user_rows, lengths, dim=0)  # [H, E]
        return self._head(rows, state)

    def _head(self, user_rows: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` states (and their users' id rows ``[N, E]``) → ``[N, D]``."""
        if self.use_user_id:
            state = torch.cat([user_rows, state], dim=1)  # [N, 2E]
        return self.head(state)


def build_sequential_tower(cfg: SequenceConfig, embedding_dim: int, hidden: list[int], out_dim: int) -> SequentialUserTower:
    """A :class:`SequentialUserTower` over table rows of width ``embedding_dim`` (E)."""
    if embedding_dim % cfg.heads:
        raise ValueError(f"model.sequence.heads={cfg.heads} must divide model.embedding_dim={embedding_dim}")
    layer = nn.TransformerEncoderLayer(
        d_model=embedding_dim, nhead=cfg.heads, dim_feedforward=cfg.ffn_mult * embedding_dim,
        dropout=cfg.dropout, activation="gelu", batch_first=True, norm_first=True,
    )
    blocks = nn.TransformerEncoder(layer, num_layers=cfg.blocks, enable_nested_tensor=False)
    positions = SlotPositions(cfg.max_len, embedding_dim, from_start=cfg.positions == "start")
    nn.init.normal_(positions.weight, std=0.02)
    head_in = embedding_dim * (2 if cfg.use_user_id else 1)
    return SequentialUserTower(blocks, positions, mlp([head_in, *hidden, out_dim]), cfg.dropout, cfg.use_user_id)
