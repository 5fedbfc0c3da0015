"""Residual quantization (RQ) with EMA codebooks: the learnable index of one MFLI facet.

An item embedding ``x`` ``[D]`` is coded level by level: level 0 picks the nearest of K codewords
to ``x``, level 1 the nearest to the residual ``x - c0``, and so on for L levels. The code path
``(c0, ..., c_{L-1})`` is the item's place in the index (its posting list), and the sum of the
chosen codewords is its reconstruction ``q``. Because a dot product is additive, a user's score
for a path prefix is the sum of its codewords' scores, which is what makes beam search over the
codes (``training.index.mfli_index``) cheap.

Why EMA codebooks and not gradients: EMA (van den Oord et al. 2017, SoundStream) moves each
codeword to the running mean of the residuals assigned to it, which trains stably alongside a
retrieval loss and needs no optimizer state. On several ranks each rank sees a different
batch, so the per-code counts and sums are all-reduced before the update: every rank applies
the same update and the codebooks stay bit-identical without being broadcast.

Balance: a code nobody uses (dead) is re-seeded from a residual of the most loaded code, which
splits that code in two; a code holding more than ``split_share`` of the items is split the same
way by taking over the least used code. Both run in :meth:`ResidualQuantizer.rebalance`, from a
pool gathered from every rank and a generator seeded identically everywhere.

Notation: N vectors, D dim, L levels, K codes per level.

Example::

    rq = ResidualQuantizer(dim=64, levels=3, codes=64)
    out = rq(x)                          # x [N, 64]; out.quantized [N, 64], out.codes [N, 3]
    loss = retrieval_loss + out.commitment
    rq.rebalance(x.detach())             # every few hundred steps
    hist = rq.occupancy(rq.encode(all_items))   # [3, 64] items per code
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RQOutput:
    """What one quantization pass returns.

    Args:
        quantized: ``[N, D]`` reconstruction with the straight-through gradient: its value is
            the sum of codewords, its gradient flows to the input unchanged.
        codes: ``[N, L]`` int64 code of each level.
        commitment: scalar ``beta * mean ||x - sg(q)||^2`` (pulls items toward their codes).
    """

    quantized: torch.Tensor
    codes: torch.Tensor
    commitment: torch.Tensor


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``[N, D]`` from every rank (same N on all ranks) → ``[world * N, D]``."""
    if _world() == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def nearest_code(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword (L2) for each row: ``[N, D]``, ``[K, D]`` → ``[N]``."""
    # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2; the first term does not change the argmin
    dist = (codebook * codebook).sum(1).unsqueeze(0) - 2.0 * residual @ codebook.T  # [N, K]
    return dist.argmin(dim=1)


def greedy_encode(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual coding, the one implementation MFLI, HSNN and the quantizer share.

    Level l picks the codeword nearest to what the levels before it left over.

    Args:
        x: ``[N, D]`` vectors (cast to the codebooks' dtype).
        codebooks: ``[L, K, D]``.

    Returns:
        codes ``[N, L]`` int64 and the residual entering each level ``[L, N, D]`` (what an EMA
        update averages per code).
    """
    residual = x.detach().to(codebooks.dtype)
    codes, inputs = [], []
    for level in range(codebooks.shape[0]):
        c = nearest_code(residual, codebooks[level])  # [N]
        inputs.append(residual)
        codes.append(c)
        residual = residual - codebooks[level][c]
    if not codes:
        return torch.empty(x.shape[0], 0, dtype=torch.int64), torch.empty(0, *x.shape)
    return torch.stack(codes, dim=1), torch.stack(inputs)


def capacity_encode(x: torch.Tensor, codebooks: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """Residual coding in which no node holds more than ``max_ratio`` times its level's mean.

    Why: greedy coding (:func:`greedy_encode`) sends every item to its nearest codeword, and on
    a skewed catalogue a few nodes collect most items (on ml-100k's HSNN tree the largest of
    256 leaves held 11x the mean; at 1M items five leaves held 46-49k items each, never-trained
    items with near-identical vectors). A beam that reaches such a leaf scores all of it, and
    the items in it are told apart by nothing but the leaf scorer. Here level l gives every
    node room for ``ceil(max_ratio * N / K^(l+1))`` items: an item goes to the nearest codeword
    whose node has room, the items nearest a full node's codeword keep their place, and the
    rest move to their next-nearest child of the same parent (a parent always has room for its
    items in its K children, so at most K rounds per level). The residual then follows the code
    actually taken, so lower levels code what this level left over.

    Args:
        x: ``[N, D]`` vectors (cast to the codebooks' dtype).
        codebooks: ``[L, K, D]``.
        max_ratio: node capacity as a multiple of its level's mean node size (>= 1).

    Returns:
        codes ``[N, L]`` int64.
    """
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (a node's room as a multiple of the mean), got {max_ratio}")
    n, levels, fanout = x.shape[0], codebooks.shape[0], codebooks.shape[1]
    residual = x.detach().to(codebooks.dtype)
    codes = torch.zeros(n, levels, dtype=torch.int64)
    parent = torch.zeros(n, dtype=torch.int64)  # node number of each item's prefix so far
    for level in range(levels):
        book = codebooks[level]  # [K, D]
        # squared distances [N, K], ||r||^2 kept: items are compared with each other for a node's room
        dist = (residual * residual).sum(1, keepdim=True) + (book * book).sum(1).unsqueeze(0) - 2.0 * residual @ book.T
        nodes = fanout ** (level + 1)
        room = torch.full((nodes,), math.ceil(max_ratio * n / nodes), dtype=torch.int64)
        pending = torch.arange(n)
        while pending.numel():
            # [P, K] distances to the children that still have room (a node fills up in a round
            # the item did not compete for, so the room is read afresh every round)
            open_dist = dist[pending].masked_fill(room.view(-1, fanout)[parent[pending]] <= 0, float("inf"))
            choice = open_dist.argmin(1)  # [P] nearest code still open to the item
            best = open_dist.gather(1, choice.unsqueeze(1)).squeeze(1)
            if not bool(torch.isfinite(best).all()):  # cannot happen with finite vectors (see above); never spin
                raise RuntimeError(f"capacity_encode: {int((~torch.isfinite(best)).sum())} items found no room at level {level} (non-finite vectors?)")
            node = parent[pending] * fanout + choice
            order = torch.argsort(best)  # nearest first, then stable by node
            order = order[torch.argsort(node[order], stable=True)]
            sorted_node = node[order]
            first = torch.searchsorted(sorted_node, sorted_node)  # first slot of each node's run
            rank = torch.arange(order.numel()) - first
            taken = rank < room[sorted_node]
            won = order[taken]  # every node chosen has room, so each round places at least one item
            codes[pending[won], level] = choice[won]
            room -= torch.bincount(node[won], minlength=nodes)
            pending = pending[order[~taken]]  # their node is full now: next round they take the next-nearest
        parent = parent * fanout + codes[:, level]
        residual = residual - book[codes[:, level]]
    return codes


def path_keys(codes: torch.Tensor, codes_per_level: int) -> torch.Tensor:
    """Code paths ``[N, L]`` → int64 keys ``[N]``: the path read as a base-K number, so
    lexicographic order of paths is key order and a level-l prefix's key is
    ``path_keys(codes[:, :l + 1], K)`` (a tree node number)."""
    key = torch.zeros(codes.shape[0], dtype=torch.int64)
    for level in range(codes.shape[1]):
        key = key * codes_per_level + codes[:, level].to(torch.int64)
    return key


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Plain Lloyd k-means on ``[N, D]`` → ``[k, D]`` centres (used once, to start a codebook).

    Empty clusters keep their previous centre; ``rebalance`` deals with them later.
    """
    pick = torch.randperm(x.shape[0], generator=generator)[:k]
    if pick.numel() < k:  # fewer points than codes: repeat points, jitter them apart
        pick = torch.randint(0, x.shape[0], (k,), generator=generator)
    centres = x[pick].clone() + 1e-3 * torch.randn(k, x.shape[1], generator=generator)
    for _ in range(iters):
        assign = nearest_code(x, centres)  # [N]
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled].unsqueeze(1)
    return centres


class ResidualQuantizer(nn.Module):
    """L levels x K codes of EMA-trained residual codebooks for D-dim vectors.

    Args:
        dim: D, the dimension of the vectors quantized.
        levels: L.
        codes: K codewords per level.
        decay: EMA decay of the per-code counts and sums (closer to 1: slower codebooks).
        commitment: beta, the weight of the commitment loss.

    Balance thresholds (``dead_share``, ``split_share``) are arguments of :meth:`rebalance`.
    """

    def __init__(self, dim: int, levels: int, codes: int, decay: float = 0.95, commitment: float = 0.25) -> None:
        super().__init__()
        if levels < 1 or codes < 2:
            raise ValueError(f"need levels >= 1 and codes >= 2, got {levels} and {codes}")
        self.dim, self.levels, self.codes = dim, levels, codes
        self.decay, self.beta = decay, commitment
        self.register_buffer("codebooks", torch.zeros(levels, codes, dim))  # [L, K, D]
        self.register_buffer("ema_count", torch.zeros(levels, codes))  # [L, K]
        self.register_buffer("ema_sum", torch.zeros(levels, codes, dim))  # [L, K, D]
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64))  # advances per rebalance

    # ------------------------------------------------------------ coding
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code paths ``[N, L]`` int64 of ``x`` ``[N, D]`` (greedy, level by level)."""
        return self._encode(x)[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[N, D]`` of code paths ``[N, L]``."""
        levels = torch.arange(self.levels, device=codes.device)
        return self.codebooks[levels, codes].sum(dim=1)  # [N, L, D] -> [N, D]

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[N, L]`` and the residual entering each level ``[L, N, D]``."""
        return greedy_encode(x, self.codebooks)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> RQOutput:
        """Quantize ``x`` ``[N, D]``; in training mode also update the codebooks (collective).

        ``weight`` ``[N]`` (1 or 0; None: all 1) scales each row's share of the EMA statistics
        and of the commitment loss: a 0 row (padding) moves no codeword and adds no loss.
        In training mode every rank must call this the same number of times (the EMA
        statistics are all-reduced).
        """
        if self.training and not bool(self.initialized):
            self._initialize(x.detach())
        codes, inputs = self._encode(x)
        if self.training:
            self._ema_update(inputs, codes, weight)
        q = self.decode(codes)  # [N, D], no grad
        if weight is None:
            commitment = self.beta * F.mse_loss(x, q)
        else:  # the mean over the weighted rows (and the D dims), as mse_loss takes over all
            per_row = ((x - q) ** 2).mean(dim=1)  # [N]
            commitment = self.beta * (per_row * weight).sum() / weight.sum().clamp(min=1)
        quantized = x + (q - x).detach()  # straight-through: value q, gradient to x
        return RQOutput(quantized=quantized, codes=codes, commitment=commitment)

    # ------------------------------------------------------------ training the codebooks
    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        """k-means per level on the first batch of every rank (identical on all ranks)."""
        pool = _all_gather_rows(x)  # [world * N, D]
        generator = torch.Generator().manual_seed(int(self.seed))
        residual = pool
        for level in range(self.levels):
            centres = kmeans(residual, self.codes, iters=10, generator=generator)
            self.codebooks[level] = centres
            assign = nearest_code(residual, centres)
            residual = residual - centres[assign]
        self.ema_count.fill_(pool.shape[0] / self.codes)
        self.ema_sum.copy_(self.codebooks * self.ema_count.unsqueeze(-1))
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, inputs: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Move each codeword toward the mean of its residuals (statistics summed over ranks;
        ``weight`` ``[N]`` scales each row's count and sum)."""
        counts = torch.zeros(self.levels, self.codes)
        sums = torch.zeros(self.levels, self.codes, self.dim)
        for level in range(self.levels):
            counts[level] = torch.bincount(codes[:, level], weights=weight, minlength=self.codes).to(counts.dtype)
            rows = inputs[level] if weight is None else inputs[level] * weight.unsqueeze(1)
            sums[level].index_add_(0, codes[:, level], rows)
        # one collective for both statistics: [L, K, D + 1]
        stats = _all_reduce_sum(torch.cat([sums, counts.unsqueeze(-1)], dim=-1))
        sums, counts = stats[..., :-1], stats[..., -1]
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a code with no recent residuals from dividing by zero
        total = self.ema_count.sum(dim=1, keepdim=True)  # [L, 1]
        eps = 1e-5
        smoothed = (self.ema_count + eps) / (total + self.codes * eps) * total  # [L, K]
        self.codebooks.copy_(self.ema_sum / smoothed.unsqueeze(-1))

    @torch.no_grad()
    def rebalance(
        self, x: torch.Tensor, dead_share: float = 0.1, split_share: float = 4.0, gather: bool = True
    ) -> dict[str, int]:
        """Re-seed dead codes and split oversized ones, judged on a pool ``x`` ``[N, D]``.

        Collective (all-gather of ``x``; ``gather=False`` when ``x`` is already the same on
        every rank, e.g. the whole catalogue); identical on every rank. Balance is judged on how the
        pool falls into the codes (pass the whole catalogue at the end of an epoch to balance
        posting lists, or a batch during training): a code is dead when it holds under
        ``dead_share / K`` of the pool and oversized above ``split_share / K``. A dead code
        is re-seeded at a residual of the most loaded code (+ noise) and takes half its EMA
        mass, splitting it; an oversized code left over takes over the least used code the same
        way while that one holds under a quarter of it.

        Returns:
            ``{"reseeded": dead codes re-seeded, "split": oversized codes split}`` over levels.
        """
        pool = _all_gather_rows(x.detach()) if gather else x.detach()
        self.seed.add_(1)
        generator = torch.Generator().manual_seed(int(self.seed))
        reseeded = split = 0
        for level in range(self.levels):
            # residuals entering this level under the codebooks as they are now (earlier
            # levels may just have changed)
            inputs = self._encode(pool)[1][level]  # [N, D]
            codes = nearest_code(inputs, self.codebooks[level])  # [N]
            count = torch.bincount(codes, minlength=self.codes).to(torch.float64)  # [K]
            total = float(count.sum())
            moved = False
            for dead in (count < dead_share / self.codes * total).nonzero().flatten().tolist():
                self._split_into(level, int(torch.argmax(count)), dead, codes, inputs, generator, count)
                reseeded += 1
                moved = True
            for _ in range(self.codes):  # bounded: each split halves the largest code
                source = int(torch.argmax(count))
                if count[source] <= split_share / self.codes * total:
                    break
                order = torch.argsort(count)
                target = int(order[0]) if int(order[0]) != source else int(order[1])
                if count[target] * 4 > count[source]:
                    break  # nothing small enough to give up its code
                self._split_into(level, source, target, codes, inputs, generator, count)
                split += 1
                moved = True
            if moved:
                self._lloyd_step(level, inputs)
        return {"reseeded": reseeded, "split": split}

    def _lloyd_step(self, level: int, inputs: torch.Tensor) -> None:
        """Move the codewords of ``level`` to the mean of the pool residuals nearest to them.

        After a split the two halves of a code sit almost on top of each other; one k-means
        step on the pool pulls them apart onto the two sides of the old cluster. EMA mass is
        kept, re-pointed at the new codewords.
        """
        assign = nearest_code(inputs, self.codebooks[level])
        sums = torch.zeros_like(self.codebooks[level]).index_add_(0, assign, inputs)
        counts = torch.bincount(assign, minlength=self.codes).to(sums.dtype)
        filled = counts > 0
        self.codebooks[level][filled] = sums[filled] / counts[filled].unsqueeze(1)
        self.ema_sum[level] = self.codebooks[level] * self.ema_count[level].unsqueeze(1)

    def _split_into(
        self,
        level: int,
        source: int,
        target: int,
        codes: torch.Tensor,
        inputs: torch.Tensor,
        generator: torch.Generator,
        count: torch.Tensor,
    ) -> None:
        """Re-seed code ``target`` at a residual of code ``source`` and give it half its EMA mass.

        ``codes`` ``[N]`` and ``inputs`` ``[N, D]``: the pool's codes and residuals at ``level``;
        ``count`` ``[K]``: the pool's items per code, updated in place (half moves over).
        """
        members = (codes == source).nonzero().flatten()
        if members.numel() == 0:  # the pool missed the source code: any residual will do
            members = torch.arange(codes.shape[0])
        pick = int(members[torch.randint(0, members.numel(), (1,), generator=generator)])
        noise = 1e-3 * torch.randn(self.dim, generator=generator)
        half = self.ema_count[level, source] / 2
        self.codebooks[level, target] = inputs[pick] + noise
        self.ema_count[level, target] = half
        self.ema_count[level, source] = half
        self.ema_sum[level, target] = self.codebooks[level, target] * half
        self.ema_sum[level, source] = self.codebooks[level, source] * half
        count[source] /= 2
        count[target] = count[source]

    # ------------------------------------------------------------ reporting
    def occupancy(self, codes: torch.Tensor) -> torch.Tensor:
        """Items per code, per level: codes ``[N, L]`` → ``[L, K]`` int64."""
        return torch.stack([torch.bincount(codes[:, level], minlength=self.codes) for level in range(self.levels)])


def occupancy_metrics(prefix: str, occupancy: torch.Tensor) -> dict[str, float]:
    """Scalars of an occupancy histogram ``[L, K]``: max share, dead codes, perplexity per level.

    Perplexity ``exp(entropy)`` is K for perfectly balanced codes and 1 when one code takes all.
    """
    out: dict[str, float] = {}
    for level, counts in enumerate(occupancy.to(torch.float64)):
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        out[f"{prefix}/l{level}/max_share"] = float(p.max())
        out[f"{prefix}/l{level}/dead_codes"] = float((counts == 0).sum())
        out[f"{prefix}/l{level}/perplexity"] = float(entropy.exp())
    return out
