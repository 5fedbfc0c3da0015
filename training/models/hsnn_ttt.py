"""Test-time training (TTT) of the HSNN scorer on the examples under the nodes a request visits.

Why: the follow-up to HSNN (a learned hierarchical index over a retrieval model's memory) finds
that the training examples whose item falls under the intermediate nodes a request's beam
search visits form a small, relevant set; fine-tuning the scorer on it briefly, per request,
sharpens the ranking inside exactly the part of the catalogue the request is about.

Per user of a request:

1. beam-search the tree with the trained scorer (``HSNNIndex.descend``) and note the nodes kept
   at intermediate level ``level`` (0: the first level);
2. take the pool examples (training (history, item) pairs kept in the index, see
   :class:`TTTPool`) whose item lies under those nodes, and of them the ``examples`` whose user
   vector is closest to this user's (the high-quality subset);
3. fine-tune a copy of the scorer for ``steps`` Adam steps of in-batch softmax on them;
4. search again with the tuned copy (same tree, same beam), then drop the copy.

The user vector, history keys and item vectors stay fixed: only the MoNN (its per-level
modules, interaction MLP and cross-attention) moves, so step 3 costs milliseconds.

Notation: P pool examples, M selected examples, D dim, T history length.

Example::

    ttt = TTTRetriever(index, TTTPool.load(run.index_dir / "hsnn"), TTTConfig())
    result = ttt.search(user_pack, k=100, exclude=seen)     # the retriever protocol
    ttt.seconds                                              # time spent fine-tuning so far
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.index.hsnn_index import HSNNIndex
from training.models.hsnn import UserState
from training.models.two_tower import in_batch_softmax
from training.retrieval.protocol import SearchResult


class TTTConfig(BaseModel):
    """Test-time training settings.

    Args:
        pool_size: training examples the run keeps in its index for TTT (sampled, seeded).
        examples: M, examples fine-tuned on per request.
        steps: Adam steps per request.
        lr: Adam learning rate.
        level: the intermediate tree level whose visited nodes define the example set.
        temperature: softmax temperature of the fine-tuning loss.
    """

    model_config = ConfigDict(extra="forbid")

    pool_size: int = Field(20_000, gt=0)
    examples: int = Field(128, gt=1)
    steps: int = Field(3, gt=0)
    lr: float = Field(1e-3, gt=0)
    level: int = Field(0, ge=0)
    temperature: float = Field(0.05, gt=0)


@dataclass
class TTTPool:
    """Training examples kept for TTT.

    Args:
        packs: ``[P, D + T]`` user packs (the user as of that example, see ``HSNNIndex``).
        targets: ``[P]`` int64 catalogue row of each example's item.
    """

    packs: torch.Tensor
    targets: torch.Tensor

    def save(self, folder: Path) -> None:
        torch.save({"packs": self.packs, "targets": self.targets}, Path(folder) / "ttt_pool.pt")

    @classmethod
    def load(cls, folder: Path) -> TTTPool:
        state = torch.load(Path(folder) / "ttt_pool.pt")
        return cls(state["packs"], state["targets"])


class TTTRetriever:
    """The retriever protocol with per-user test-time training in front of the beam search.

    Args:
        index: the trained :class:`HSNNIndex` (its beam is used for both searches).
        pool: :class:`TTTPool`.
        cfg: :class:`TTTConfig`.
    """

    def __init__(self, index: HSNNIndex, pool: TTTPool, cfg: TTTConfig) -> None:
        if index.beam is None:
            raise ValueError("test-time training needs a beam search index (beam is None)")
        self.index, self.pool, self.cfg = index, pool, cfg
        self.level = min(cfg.level, index.tree.levels - 2)  # an intermediate level, never the leaves
        self.pool_nodes = index.tree.node_ids(self.level)[pool.targets]  # [P]
        self.pool_u = pool.packs[:, : index.dim]  # [P, D]
        self.seconds = 0.0  # fine-tuning time, summed over calls (the latency cost of TTT)
        self.selected = 0  # examples fine-tuned on, summed over users

    def select(self, u: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Pool rows ``[M']`` under ``nodes`` (``[b]``, -1 ignored), nearest users first."""
        under = torch.isin(self.pool_nodes, nodes[nodes >= 0]).nonzero().flatten()
        if under.numel() > self.cfg.examples:
            similarity = self.pool_u[under] @ u  # [P']
            under = under[torch.topk(similarity, self.cfg.examples).indices]
        return under

    def fine_tune(self, rows: torch.Tensor):
        """A copy of the scorer after ``steps`` Adam steps on pool ``rows``."""
        scorer = copy.deepcopy(self.index.scorer).train()
        packs = self.pool.packs[rows]
        u = packs[:, : self.index.dim]
        hist_rows = packs[:, self.index.dim :].round().to(torch.int64)
        mask = hist_rows >= 0
        state = UserState(u, self.index.history_keys[hist_rows.clamp(min=0)] * mask.unsqueeze(-1), mask)
        targets = self.pool.targets[rows]
        vectors = self.index.item_vectors[targets]  # [M, D]
        optimizer = torch.optim.Adam(scorer.parameters(), lr=self.cfg.lr)
        for _ in range(self.cfg.steps):
            logits = scorer(scorer.prepare(state), vectors, level=self.index.tree.levels)  # [M, M]
            loss = in_batch_softmax(logits, targets, None, self.cfg.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return scorer.eval()

    def search(self, user_emb: torch.Tensor, k: int, exclude: list[torch.Tensor] | None = None) -> SearchResult:
        """Top-k per user after fine-tuning on that user's visited nodes (one user at a time)."""
        ids, scores, stats = [], [], {"items_scored": 0, "nodes_scored": 0}
        for b in range(user_emb.shape[0]):
            pack = user_emb[b : b + 1]
            with torch.no_grad():
                state = self.index.user_state(pack)
                _, visited, nodes_scored = self.index.descend(state, self.index.beam)
            t0 = time.perf_counter()
            rows = self.select(state.u[0], visited[self.level][0])
            tuned = self.index.with_scorer(self.fine_tune(rows)) if rows.numel() > 1 else self.index
            self.seconds += time.perf_counter() - t0
            self.selected += int(rows.numel())
            result = tuned.search(pack, k, exclude=None if exclude is None else exclude[b : b + 1])
            ids.append(result.item_ids)
            scores.append(result.scores)
            stats["items_scored"] += result.stats["items_scored"]
            stats["nodes_scored"] += result.stats["nodes_scored"] + nodes_scored
        return SearchResult(torch.cat(ids), torch.cat(scores), stats)
