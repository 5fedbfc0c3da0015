"""HSNN serving index: beam search down the learned tree with the MoNN scorer (retriever protocol).

Search for a batch of users, beam width b:

1. the user state is built once (user vector, history keys and their projections);
2. level 0: score all K root nodes, keep the b best (empty nodes never kept);
3. level l > 0: score the K children of each kept node (b x K per user), keep the b best;
4. score every item in the b reached leaves exactly with the MoNN, mask seen items, top-k.

How a node is scored (``node_scoring``):

* ``"item_mean"`` (default): as an item, by the MoNN's item module, at the mean vector of the
  items under it (computed once per index). Why: on the 1M catalogue the exhaustive MoNN
  top-100 of a user lies in ~38 leaves, yet the per-level node modules ranked those leaves so
  poorly that beam 256 reached 45% of them, and scoring all 32,768 leaves with those modules
  (no pruning at all) reached 46%: routing lost the items, not the beam width. A leaf scored at
  its items' mean by the module trained to rank items reached 95% at beam 256 (1.4% of the
  catalogue scored). The node modules still shape training (the per-level losses).
* ``"codebook"``: the node's codeword sum through that level's node module (the trained
  routing as the model defines it).

``beam=None`` is exhaustive scoring: every item scored by the MoNN, the quality ceiling the
beam search is measured against. ``stats`` counts (user, node) and (user, item) scores.

**The "user embedding" of this retriever is a packed tensor** ``[B, D + T]``: the user vector
``u`` (``[:, :D]``) followed by the user's T most recent history items as *catalogue rows*
(rows of the ascending item-id order, stored as float, -1 where padded; float32 holds row
numbers exactly up to 2^24 items). The index holds each item's history key, so the pack stays
small. ``HSNN.forward`` (``training/models/hsnn.py``) produces it; ``index/hsnn/users.pt`` of a
run holds every user's pack.

Notation: B users, D dim, T history length, L levels, K fanout, b beam, N items, M candidates.

Example::

    index = HSNNIndex.load(run.index_dir / "hsnn")
    result = index.search(user_pack, k=10, exclude=seen)          # beam from hsnn.json
    ceiling = index.with_beam(None).search(user_pack, k=10, exclude=seen)
    result.stats  # {"items_scored": ..., "nodes_scored": ...}
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from training.models.hsnn import MoNNScorer, UserState
from training.models.hsnn_tree import HSNNTree
from training.retrieval.exclude import excluded_positions
from training.retrieval.protocol import PAD_ITEM_ID, SearchResult, check_search_args

ITEM_CHUNK = 4096
"""Items scored at once by exhaustive search: bounds memory at B x 4096 x max(H, T, D) floats."""
BLOCK_SLOTS = 1 << 14
"""(user, target) slots beam search scores as one block. Why small: the MoNN's elementwise work
(the bilinear products, the attention's adds and ReLUs) is memory-bound, and a block of 16k
slots x D floats (4 MB) stays in cache. At 1M items, beam 256 (8,192 children per user and
level), a batch of 32 users scored as one block cost 33 ms per user against 18 ms one user at a
time: ``add``/``mul`` took 7x the time on 32x the data."""
NODE_SCORING = ("item_mean", "codebook")
"""How beam search scores a node (module docstring)."""


class HSNNIndex:
    """Tree + item vectors + MoNN scorer behind ``search``.

    Args:
        scorer: the trained :class:`MoNNScorer` (put in eval mode here).
        tree: :class:`HSNNTree` (item rows in its ``item_ids`` order).
        item_vectors: ``[N, D]`` item vectors, rows as ``tree.item_ids``.
        history_keys: ``[N, D]`` each item's key when it appears in a history.
        beam: b, nodes kept per level; None scores every item (exhaustive).
    """

    def __init__(
        self,
        scorer: MoNNScorer,
        tree: HSNNTree,
        item_vectors: torch.Tensor,
        history_keys: torch.Tensor,
        beam: int | None,
        node_scoring: str = "item_mean",
    ) -> None:
        if item_vectors.shape[0] != tree.item_ids.shape[0] or history_keys.shape != item_vectors.shape:
            raise ValueError("item_vectors and history_keys need one row per tree item")
        if node_scoring not in NODE_SCORING:
            raise ValueError(f"node_scoring must be one of {NODE_SCORING}, got {node_scoring!r}")
        self.scorer = scorer.eval()
        self.tree = tree
        self.item_vectors = item_vectors
        self.history_keys = history_keys
        self.beam = beam
        self.node_scoring = node_scoring
        self._offsets, self._leaf_rows = tree.leaf_lists()
        self._node_sizes = [tree.node_sizes(level) for level in range(tree.levels)]
        # per level, the vector each node is scored at ``[K^(l+1), D]``, and the scorer module used
        self._node_vectors = [self._mean_vectors(l) if node_scoring == "item_mean" else tree.node_vectors(l) for l in range(tree.levels)]
        self._node_module = [tree.levels if node_scoring == "item_mean" else l for l in range(tree.levels)]
        # the target-side half of every MoNN score, once per build (``MoNNScorer.project``): a
        # search gathers rows [N, P] / [K^(l+1), P] instead of projecting each (user, candidate)
        # pair again. Costs N x P floats (P = D + 2H + 2R: 224 at D = H = 64, R = 16).
        self._item_proj, self._node_proj = self._project(self.scorer)

    @property
    def num_items(self) -> int:
        return self.item_vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.item_vectors.shape[1]

    def with_beam(self, beam: int | None) -> HSNNIndex:
        """The same index searched with another beam width (None: exhaustive)."""
        other = copy.copy(self)
        other.beam = beam
        return other

    def with_scorer(self, scorer: MoNNScorer) -> HSNNIndex:
        """The same tree and items scored by another scorer (test-time training)."""
        other = copy.copy(self)
        other.scorer = scorer.eval()
        # a per-request scorer (TTT) projects only the candidates it scores, not the catalogue
        other._item_proj, other._node_proj = None, None
        return other

    # ------------------------------------------------------------ user state
    def user_state(self, user_pack: torch.Tensor) -> UserState:
        """Unpack ``[B, D + T]`` into a prepared :class:`UserState`."""
        if user_pack.dim() != 2 or user_pack.shape[1] <= self.dim:
            raise ValueError(f"expected a user pack [B, {self.dim} + T], got {tuple(user_pack.shape)}")
        u = user_pack[:, : self.dim].to(torch.float32)
        rows = user_pack[:, self.dim :].round().to(torch.int64)  # [B, T]
        mask = rows >= 0
        history = self.history_keys[rows.clamp(min=0)] * mask.unsqueeze(-1)  # [B, T, D]
        with torch.no_grad():
            return self.scorer.prepare(UserState(u, history, mask))

    # ------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        """Top-k items per user (``training.retrieval.protocol``); ``user_emb`` is the user pack."""
        batch = check_search_args(user_emb, k, exclude)
        state = self.user_state(user_emb)
        if self.beam is None:
            rows = torch.arange(self.num_items).expand(batch, -1)  # [B, N]
            scores = torch.cat(
                [self.scorer.score(state, self._item_targets(slice(s, s + ITEM_CHUNK))) for s in range(0, self.num_items, ITEM_CHUNK)],
                dim=1,
            )
            nodes_scored, items_scored = 0, batch * self.num_items
        else:
            # descend on blocks of users whose widest node block [users, beam * K] fits BLOCK_SLOTS
            users = max(1, BLOCK_SLOTS // (self.beam * self.tree.fanout))
            blocks = [self.descend(state.select(slice(s, s + users)), self.beam) for s in range(0, batch, users)]
            leaves = torch.cat([leaves for leaves, _, _ in blocks])
            found = self._score_leaves(state, leaves, k, exclude, sum(scored for _, _, scored in blocks))
            return self._widen_short_rows(user_emb, k, exclude, found)
        scores = scores.masked_fill(self._excluded(rows, exclude), float("-inf"))
        return self._top_k(scores, rows, k, {"items_scored": items_scored, "nodes_scored": nodes_scored})

    def dot_vectors(self) -> torch.Tensor:
        """Item vectors ``[N, D]`` of the MoNN's dot-product term at the item level (rows as
        ``tree.item_ids``): the user vector ``u`` (``pack[:, :D]``) dotted with these is
        ``MoNNScorer.forward``'s ``dot``, before the interaction MLP and the history attention.

        Why: the MoNN is not an inner product, so no MIPS index can hold exactly what HSNN scores;
        this is the largest part of its score that one can (a FAISS baseline's input on "the
        same vectors"), and :meth:`rescore` puts the rest back on FAISS's candidates.
        """
        level = self.tree.levels
        with torch.no_grad():
            return self.item_vectors * (1 + self.scorer.level_scale[level]) + self.scorer.level_bias[level]

    @torch.no_grad()
    def rescore(self, user_emb: torch.Tensor, item_ids: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        """Top-k of given candidates ``[B, C]`` (raw ids, ``PAD_ITEM_ID`` ignored) by the full MoNN score.

        ``user_emb`` is the user pack; ``stats["items_scored"]`` counts the candidates scored.
        """
        state = self.user_state(user_emb)
        ids = self.tree.item_ids
        pos = torch.searchsorted(ids, item_ids.clamp(min=0)).clamp(max=self.num_items - 1)
        rows = torch.where((item_ids >= 0) & (ids[pos] == item_ids), pos, self.num_items)  # [B, C], N: none
        scores = self.scorer.score(state, self._item_targets(rows.clamp(max=self.num_items - 1)))
        scores = scores.masked_fill((rows >= self.num_items) | self._excluded(rows, exclude), float("-inf"))
        return self._top_k(scores, rows, k, {"items_scored": int((rows < self.num_items).sum()), "nodes_scored": 0})

    def _widen_short_rows(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None,
                          found: SearchResult) -> SearchResult:
        """Search again, with twice the beam (up to every item), the users whose reached leaves
        held fewer than k items they had not seen.

        Why: leaf sizes are skewed, so a narrow beam can land on a few small leaves, and a user
        with a long history may have seen most of what they hold; the answer would come back
        short. Widening only those rows keeps the common case's cost and gives every user k
        items whenever the catalogue has them. ``stats`` adds the extra work.
        """
        short = (found.item_ids == PAD_ITEM_ID).any(1).nonzero().flatten()  # [S]
        if len(short) == 0 or self.beam is None:
            return found
        wider_beam = self.beam * 2
        wider = self.with_beam(wider_beam if wider_beam < self.tree.fanout ** self.tree.levels else None)
        part = wider.search(user_emb[short], k, [exclude[i] for i in short.tolist()] if exclude is not None else None)
        ids, scores = found.item_ids.clone(), found.scores.clone()
        ids[short], scores[short] = part.item_ids, part.scores
        stats = {name: value + part.stats.get(name, 0) for name, value in found.stats.items()}
        return SearchResult(ids, scores, {**stats, "rows_widened": len(short)})

    def _score_leaves(self, state: UserState, leaves: torch.Tensor, k: int, exclude: list[torch.Tensor] | None,
                      nodes_scored: int) -> SearchResult:
        """Exact MoNN scores of the items under each user's reached leaves ``[B, b]``, top-k out.

        Why in groups: candidates are scored as one padded ``[g, M, D]`` block, M being the
        group's widest user's count. Leaf sizes are skewed (at 1M items one leaf held 46k items
        while a typical user reaches 4k), so one such user in a batch made every user in it pay
        for 46k. Users are grouped by candidate count (within a factor of 2), each group capped
        at ``BLOCK_SLOTS`` slots (one user at least), so padding at most doubles the work and
        the block stays in cache.
        """
        batch = leaves.shape[0]
        counts = self._leaf_sizes(leaves).sum(1)  # [B]
        ids = torch.full((batch, k), PAD_ITEM_ID, dtype=torch.int64)
        values = torch.full((batch, k), float("-inf"))
        for group in _width_groups(counts):
            rows = self._leaf_items(leaves[group])  # [g, M], N where padded
            # padded slots (row N) read row N-1 and are masked below: no copy of the item matrix
            targets = self._item_targets(rows.clamp(max=self.num_items - 1))  # [g, M, P]
            scores = self.scorer.score(state.select(group), targets)
            scores = scores.masked_fill(rows >= self.num_items, float("-inf"))
            part_exclude = [exclude[i] for i in group.tolist()] if exclude is not None else None
            scores = scores.masked_fill(self._excluded(rows, part_exclude), float("-inf"))
            part = self._top_k(scores, rows, k, {})
            ids[group], values[group] = part.item_ids, part.scores
        return SearchResult(ids, values, {"items_scored": int(counts.sum()), "nodes_scored": nodes_scored})

    def descend(self, state: UserState, beam: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        """Beam search down the tree.

        Returns:
            leaves ``[B, b']`` kept leaf numbers (-1 where fewer non-empty leaves exist),
            the kept node numbers of every level (``[B, b_l]`` each, the visited path), and
            the (user, node) scores computed.
        """
        batch, fanout = state.u.shape[0], self.tree.fanout
        nodes = torch.arange(fanout).expand(batch, -1)  # [B, K]
        alive = torch.ones(batch, fanout, dtype=torch.bool)
        scored = 0
        visited = []
        for level in range(self.tree.levels):
            if level > 0:
                # children of every kept node: [B, b, K] -> [B, b * K]
                nodes = (nodes.unsqueeze(2) * fanout + torch.arange(fanout)).flatten(1)
                alive = alive.repeat_interleave(fanout, dim=1)  # children of a padded (-1) node are dead
            # the K roots are the same for every user: scored as one shared [K, P] target block
            scores = self.scorer.score(state, self._node_targets(level, None if level == 0 else nodes))  # [B, M]
            scored += nodes.numel()  # computed, including children of padded nodes
            alive = alive & (self._node_sizes[level][nodes] > 0)  # never keep an empty node
            scores = scores.masked_fill(~alive, float("-inf"))
            keep = torch.topk(scores, min(beam, scores.shape[1]), dim=1).indices  # [B, b]
            nodes, alive = nodes.gather(1, keep), alive.gather(1, keep)
            visited.append(nodes.masked_fill(~alive, -1))
        return visited[-1], visited, scored

    @torch.no_grad()
    def _project(self, scorer: MoNNScorer) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Projected item rows ``[N, P]`` and node rows per level ``[K^(l+1), P]``."""
        items = torch.cat([scorer.project(self.item_vectors[s : s + ITEM_CHUNK], self.tree.levels)
                           for s in range(0, max(self.num_items, 1), ITEM_CHUNK)])  # fmt: skip
        nodes = [scorer.project(v, m) for v, m in zip(self._node_vectors, self._node_module)]
        return items, nodes

    def _item_targets(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Projected targets of item ``rows`` (``[B, M]`` or a slice) → ``[B, M, P]`` / ``[M, P]``."""
        if self._item_proj is not None:
            return self._item_proj[rows]
        return self.scorer.project(self.item_vectors[rows], self.tree.levels)

    def _node_targets(self, level: int, nodes: torch.Tensor | None) -> torch.Tensor:
        """Projected targets of ``level``'s nodes ``[B, M]`` (None: every node, ``[K^(l+1), P]``)."""
        if self._node_proj is not None:
            table = self._node_proj[level]
            return table if nodes is None else table[nodes]
        vectors = self._node_vectors[level] if nodes is None else self._node_vectors[level][nodes]
        return self.scorer.project(vectors, self._node_module[level])

    def _mean_vectors(self, level: int) -> torch.Tensor:
        """Mean item vector under each node of ``level`` ``[K^(level+1), D]`` (zeros when empty)."""
        sizes = self._node_sizes[level].clamp(min=1).unsqueeze(1).to(self.item_vectors.dtype)
        sums = torch.zeros(sizes.shape[0], self.dim, dtype=self.item_vectors.dtype)
        return sums.index_add_(0, self.tree.node_ids(level), self.item_vectors) / sizes

    # ------------------------------------------------------------ helpers
    def _leaf_sizes(self, leaves: torch.Tensor) -> torch.Tensor:
        """Items under each of the leaves ``[B, b]`` (0 where a leaf is -1)."""
        safe = leaves.clamp(min=0)
        return torch.where(leaves >= 0, self._offsets[safe + 1] - self._offsets[safe], 0)

    def _leaf_items(self, leaves: torch.Tensor) -> torch.Tensor:
        """Item rows under each user's leaves ``[B, b]`` → ``[B, M]`` ascending, padded with N."""
        batch = leaves.shape[0]
        starts = self._offsets[leaves.clamp(min=0)]
        counts = self._leaf_sizes(leaves)  # [B, b]
        totals = counts.sum(1)  # [B]
        width = max(int(totals.max()) if batch else 0, 1)
        flat_counts = counts.flatten()
        first = torch.repeat_interleave(starts.flatten(), flat_counts)  # [S] posting start of each slot
        seg_start = torch.repeat_interleave(torch.cumsum(flat_counts, 0) - flat_counts, flat_counts)
        rows = self._leaf_rows[first + torch.arange(first.numel()) - seg_start]  # [S]
        user = torch.repeat_interleave(torch.arange(batch), totals)
        col = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(totals, 0) - totals, totals)
        out = torch.full((batch, width), self.num_items, dtype=torch.int64)
        out[user, col] = rows
        return out.sort(dim=1).values  # ascending rows: the same order exhaustive search scores them in

    def _excluded(self, rows: torch.Tensor, exclude: list[torch.Tensor] | None) -> torch.Tensor:
        """``[B, M]`` True where ``rows`` holds an item the user excludes."""
        if not exclude:
            return torch.zeros_like(rows, dtype=torch.bool)
        user, pos = excluded_positions(exclude, self.tree.item_ids)  # tree rows are sorted by id
        width = self.num_items + 1
        keys = torch.arange(rows.shape[0]).unsqueeze(1) * width + rows
        return torch.isin(keys, user * width + pos)

    def _top_k(self, scores: torch.Tensor, rows: torch.Tensor, k: int, stats: dict[str, int]) -> SearchResult:
        """Best k per row (ties: lower row first) → raw ids, padded to k."""
        values, order = torch.sort(scores, dim=1, descending=True, stable=True)
        values, order = values[:, :k], order[:, :k]
        picked = rows.gather(1, order)
        ids = self.tree.item_ids[picked.clamp(max=self.num_items - 1)]
        ids = ids.masked_fill(torch.isneginf(values) | (picked >= self.num_items), PAD_ITEM_ID)
        if values.shape[1] < k:
            pad = k - values.shape[1]
            ids = torch.cat([ids, torch.full((ids.shape[0], pad), PAD_ITEM_ID)], dim=1)
            values = torch.cat([values, torch.full((values.shape[0], pad), float("-inf"))], dim=1)
        return SearchResult(item_ids=ids, scores=values.to(torch.float32), stats=stats)

    # ------------------------------------------------------------ persistence
    def save(self, folder: Path, info: dict) -> None:
        """Write ``tree.pt``, ``items.pt``, ``scorer.pt`` and ``hsnn.json`` into ``folder``."""
        folder = Path(folder)
        self.tree.save(folder)
        torch.save({"item_vectors": self.item_vectors, "history_keys": self.history_keys}, folder / "items.pt")
        torch.save(self.scorer.state_dict(), folder / "scorer.pt")
        meta = {
            "model": "hsnn",
            "dim": self.dim,
            "scorer_hidden": self.scorer.hidden,
            "attention_dim": self.scorer.attention_dim,
            "levels": self.tree.levels,
            "fanout": self.tree.fanout,
            "beam": self.beam,
            "node_scoring": self.node_scoring,
            "num_items": self.num_items,
            **info,
        }
        (folder / "hsnn.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path, beam: int | None = None, node_scoring: str | None = None) -> HSNNIndex:
        """Read an index written by :meth:`save` (``beam`` / ``node_scoring`` None: the saved ones)."""
        folder = Path(folder)
        meta = json.loads((folder / "hsnn.json").read_text())
        scorer = MoNNScorer(meta["dim"], meta["scorer_hidden"], meta["levels"], meta["attention_dim"])
        scorer.load_state_dict(torch.load(folder / "scorer.pt"))
        items = torch.load(folder / "items.pt")
        return cls(
            scorer,
            HSNNTree.load(folder),
            items["item_vectors"],
            items["history_keys"],
            beam or meta["beam"],
            # runs written before node_scoring existed get the default
            node_scoring or meta.get("node_scoring", "item_mean"),
        )


class RescoredRetriever:
    """Candidates from any retriever over the HSNN dot-product term, re-ranked by the full MoNN.

    The two-stage pipeline a FAISS user would build for a non-dot-product scorer: ``candidates``
    (e.g. a :class:`~training.retrieval.faiss_retriever.FaissRetriever` over
    :meth:`HSNNIndex.dot_vectors`) returns ``fetch`` items per user for ``u`` (the pack's first
    D columns), and :meth:`HSNNIndex.rescore` ranks them with the MoNN. Its output is judged
    against the same exhaustive MoNN top-k as HSNN's beam search.

    Args:
        index: the :class:`HSNNIndex` whose scorer re-ranks.
        candidates: any retriever over ``[B, D]`` user vectors.
        fetch: candidates per user (>= k).
    """

    def __init__(self, index: HSNNIndex, candidates, fetch: int) -> None:
        self.index, self.candidates, self.fetch = index, candidates, fetch

    def search(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        found = self.candidates.search(user_emb[:, : self.index.dim], max(self.fetch, k), exclude=exclude)
        result = self.index.rescore(user_emb, found.item_ids, k, exclude=None)  # seen items already masked
        stats = {"items_scored": found.stats.get("items_scored", 0) + result.stats["items_scored"],
                 "nodes_scored": found.stats.get("nodes_scored", 0)}
        return SearchResult(result.item_ids, result.scores, stats)


def hsnn_retrievers(index_dir: Path) -> dict[str, HSNNIndex]:
    """The HSNN rows of the retrieval table for a run's ``index/``: beam search and exhaustive."""
    index = HSNNIndex.load(Path(index_dir) / "hsnn")
    return {"hsnn_beam": index, "hsnn_exhaustive": index.with_beam(None)}


def read_user_packs(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user's pack from ``users.pt`` of an HSNN index folder (``index/hsnn/``).

    Returns:
        user_ids: ``[U]`` int64 raw ids, ascending.
        packs: ``[U, D + T]`` float32, row i for ``user_ids[i]`` (the ``search`` input).
    """
    users = torch.load(Path(folder) / "users.pt")
    order = torch.argsort(users["user_ids"])
    return users["user_ids"][order], users["packs"][order]


def with_user_packs(index_dir: Path, data):
    """An eval set (``training.eval.harness.EvalSet``) whose ``user_emb`` are the users' HSNN packs.

    ``rayrec eval`` reads dot-product user vectors from ``index/users.parquet``; HSNN search needs
    the packs from ``index/hsnn/users.pt`` instead (same users, same targets and exclusions).
    """
    from training.eval.harness import EvalSet

    ids, packs = read_user_packs(Path(index_dir) / "hsnn")
    pos = torch.searchsorted(ids, data.user_ids).clamp(max=len(ids) - 1)
    if not bool((ids[pos] == data.user_ids).all()):
        raise ValueError(f"{index_dir}: some eval users have no HSNN pack")
    return EvalSet(data.user_ids, packs[pos], data.targets, data.exclude)


def _width_groups(counts: torch.Tensor) -> list[torch.Tensor]:
    """Users ``[B]`` by candidate count: groups (index tensors) whose counts lie within a factor
    of 2 of each other, each holding at most ``BLOCK_SLOTS`` padded slots (one user at least)."""
    order = torch.argsort(counts, stable=True)
    bucket = torch.log2(counts[order].clamp(min=1).to(torch.float64)).floor().to(torch.int64)
    groups = []
    for members in torch.split(order, torch.unique_consecutive(bucket, return_counts=True)[1].tolist()):
        width = max(int(counts[members].max()), 1)
        groups.extend(torch.split(members, max(1, BLOCK_SLOTS // width)))
    return groups
