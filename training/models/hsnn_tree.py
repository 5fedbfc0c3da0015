"""The HSNN tree: which node every item sits under, and how healthy the tree is.

The tree is the residual quantizer's codebooks (``[L, K, D]``) plus each item's code path
(``[N, L]``). A node at level l is a code prefix ``(c0, ..., cl)``, numbered
``c0 * K^l + ... + cl``; its vector is the sum of its codewords. Leaves are the level-(L-1)
nodes (K^L of them; 256 for 16 x 16) and hold the items.

This file owns what the training job does with the tree between epochs:

* **assignment / freshness**: items are re-coded with the current codebooks every epoch
  (:meth:`HSNNTree.build`), and :meth:`HSNNTree.changed_share` reports the share of items whose
  leaf changed since the previous tree;
* **collapse**: :func:`tree_metrics` gives the node-size entropy (normalised: 1.0 is perfectly
  balanced), the largest node's share and the share of empty nodes per level. The balance
  itself is kept by the quantizer's re-seeding of dead codes and splitting of oversized ones
  (``ResidualQuantizer.rebalance``), run on the whole catalogue each epoch;
* **cold start**: :class:`ContentPlacer` maps an item's content (genres, release decade) to an
  item vector with a ridge regression fitted on the warm catalogue, so an item with no
  interactions is coded into the tree like any other.

Notation: N items, D dim, L levels, K codes per level, C content features.

Example::

    tree = HSNNTree.build(codebooks, item_ids, item_vectors)    # [L, K, D], [N], [N, D]
    tree_metrics(tree)["l1/entropy"]                             # leaf balance, 0..1
    placer = ContentPlacer.fit(content_matrix(items), item_vectors, vocabulary)
    codes = tree.encode(placer.predict(content_matrix(new_items)))  # [N', L]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from training.models.rq import capacity_encode, greedy_encode, path_keys

DECADES = tuple(range(1920, 2010, 10))
"""Release decades with their own content feature (earlier years fall into the first)."""


@dataclass
class HSNNTree:
    """Codebooks and item code paths.

    Args:
        codebooks: ``[L, K, D]`` float32.
        item_ids: ``[N]`` int64 raw ids, ascending (row i of every item array is ``item_ids[i]``).
        codes: ``[N, L]`` int64 code path of each item.
    """

    codebooks: torch.Tensor
    item_ids: torch.Tensor
    codes: torch.Tensor

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    @property
    def fanout(self) -> int:
        return self.codebooks.shape[1]

    @classmethod
    def build(cls, codebooks: torch.Tensor, item_ids: torch.Tensor, vectors: torch.Tensor,
              max_leaf_ratio: float | None = None) -> HSNNTree:  # fmt: skip
        """Code every item (rows sorted by id first) level by level: greedily, or with every
        node capped at ``max_leaf_ratio`` times its level's mean size (``rq.capacity_encode``)."""
        order = torch.argsort(item_ids)
        tree = cls(codebooks.detach().clone(), item_ids[order].clone(), torch.empty(0, dtype=torch.int64))
        if max_leaf_ratio is None:
            tree.codes = tree.encode(vectors[order])
        else:
            tree.codes = capacity_encode(vectors[order], tree.codebooks, max_leaf_ratio)
        return tree

    @torch.no_grad()
    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """Code paths ``[N, L]`` of ``vectors`` ``[N, D]`` (``rq.greedy_encode``)."""
        return greedy_encode(vectors, self.codebooks)[0]

    def node_ids(self, level: int, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Node number at ``level`` of each item ``[N]`` (prefix ``c0..c_level`` in base K)."""
        codes = self.codes if codes is None else codes
        return path_keys(codes[:, : level + 1], self.fanout)

    def node_vectors(self, level: int) -> torch.Tensor:
        """Vectors of every node at ``level`` ``[K^(level+1), D]``, numbered as :meth:`node_ids`."""
        vectors = self.codebooks[0]  # [K, D]
        for l in range(1, level + 1):
            vectors = (vectors.unsqueeze(1) + self.codebooks[l].unsqueeze(0)).reshape(-1, vectors.shape[-1])
        return vectors

    def node_sizes(self, level: int) -> torch.Tensor:
        """Items under each node at ``level`` ``[K^(level+1)]`` int64."""
        return torch.bincount(self.node_ids(level), minlength=self.fanout ** (level + 1))

    def leaf_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Posting lists in CSR form: ``offsets [K^L + 1]`` and item rows ``[N]`` grouped by leaf.

        Rows within a leaf are ascending, so a leaf's items come out in id order.
        """
        leaves = self.node_ids(self.levels - 1)
        order = torch.sort(leaves, stable=True).indices
        offsets = torch.zeros(self.fanout**self.levels + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(torch.bincount(leaves, minlength=self.fanout**self.levels), 0)
        return offsets, order

    def changed_share(self, previous: HSNNTree) -> float:
        """Share of this tree's items whose leaf differs from ``previous`` (items in both)."""
        pos = torch.searchsorted(previous.item_ids, self.item_ids).clamp(max=max(len(previous.item_ids) - 1, 0))
        common = previous.item_ids[pos] == self.item_ids
        if not bool(common.any()):
            return 0.0
        now = self.node_ids(self.levels - 1)[common]
        before = previous.node_ids(previous.levels - 1)[pos[common]]
        return float((now != before).float().mean())

    # ------------------------------------------------------------ persistence
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"codebooks": self.codebooks, "item_ids": self.item_ids, "codes": self.codes}, folder / "tree.pt")

    @classmethod
    def load(cls, folder: Path) -> HSNNTree:
        state = torch.load(Path(folder) / "tree.pt")
        return cls(state["codebooks"], state["item_ids"], state["codes"])


def entropy(sizes: torch.Tensor) -> float:
    """Normalised entropy of a node-size histogram: 1.0 when every node holds the same, 0 for one node."""
    p = sizes.to(torch.float64) / sizes.sum().clamp(min=1)
    p = p[p > 0]
    return float(-(p * p.log()).sum() / np.log(sizes.numel())) if sizes.numel() > 1 else 1.0


def tree_metrics(tree: HSNNTree, prefix: str = "hsnn") -> dict[str, float]:
    """Per level: normalised node-size entropy, largest node share, empty node share."""
    out: dict[str, float] = {}
    for level in range(tree.levels):
        sizes = tree.node_sizes(level)
        out[f"{prefix}/l{level}/entropy"] = entropy(sizes)
        out[f"{prefix}/l{level}/max_share"] = float(sizes.max()) / max(float(sizes.sum()), 1.0)
        out[f"{prefix}/l{level}/empty_share"] = float((sizes == 0).float().mean())
    return out


# ---------------------------------------------------------------- cold start
def content_vocabulary(items: pa.Table) -> list[str]:
    """Content feature names: every genre seen in ``items`` (sorted), then the decades."""
    genres = sorted({g for gs in items.column("genres").to_pylist() for g in (gs or [])})
    return [f"genre:{g}" for g in genres] + [f"decade:{d}" for d in DECADES]


def content_matrix(items: pa.Table, vocabulary: list[str]) -> torch.Tensor:
    """Multi-hot content ``[N, C]`` in ``items`` row order: genres and the release decade.

    Genres outside ``vocabulary`` are dropped (a new genre has no learned meaning yet).
    """
    column = {name: i for i, name in enumerate(vocabulary)}
    out = np.zeros((items.num_rows, len(vocabulary)), dtype=np.float32)
    for row, (genres, year) in enumerate(zip(items.column("genres").to_pylist(), items.column("year").to_pylist())):
        for g in genres or []:
            if f"genre:{g}" in column:
                out[row, column[f"genre:{g}"]] = 1.0
        if year is not None:
            decade = min(max((year // 10) * 10, DECADES[0]), DECADES[-1])
            out[row, column[f"decade:{decade}"]] = 1.0
    return torch.from_numpy(out)


@dataclass
class ContentPlacer:
    """Ridge regression from content ``[C]`` to item vector ``[D]``: where a cold item goes.

    Why a closed form and not a trained tower: placement only needs the vector's neighbourhood,
    a ridge fit on the warm items takes milliseconds at the end of each epoch, and it follows
    the tree as it drifts without its own optimiser state.

    Args:
        weight: ``[C + 1, D]`` (last row: intercept).
        vocabulary: the content feature names (columns of :func:`content_matrix`).
    """

    weight: torch.Tensor
    vocabulary: list[str]

    @classmethod
    def fit(cls, content: torch.Tensor, vectors: torch.Tensor, vocabulary: list[str], ridge: float = 1.0) -> ContentPlacer:
        """Solve ``min ||[X 1] W - V||^2 + ridge ||W||^2`` for ``X`` ``[N, C]``, ``V`` ``[N, D]``."""
        x = torch.cat([content, torch.ones(content.shape[0], 1)], dim=1).to(torch.float64)  # [N, C + 1]
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
        weight = torch.linalg.solve(gram, x.T @ vectors.to(torch.float64))  # [C + 1, D]
        return cls(weight.to(torch.float32), list(vocabulary))

    def predict(self, content: torch.Tensor) -> torch.Tensor:
        """Item vectors ``[N, D]`` (L2-normalised, like trained item vectors) from content ``[N, C]``."""
        x = torch.cat([content, torch.ones(content.shape[0], 1)], dim=1)
        return torch.nn.functional.normalize(x @ self.weight, dim=-1)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.weight, folder / "content_placer.pt")
        (folder / "content_vocabulary.json").write_text(json.dumps(self.vocabulary))

    @classmethod
    def load(cls, folder: Path) -> ContentPlacer:
        folder = Path(folder)
        return cls(torch.load(folder / "content_placer.pt"), json.loads((folder / "content_vocabulary.json").read_text()))
