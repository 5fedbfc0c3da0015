"""Items added and removed while the app serves, as one Ingress replica applies them.

``POST /items`` carries new items' content; the ``HistoryBoard`` makes each change durable and
fans it out (``serving.history_board``, ``training.data.catalogue_log``); every Ingress replica then
hands it to its :class:`LiveCatalogue`, which

- embeds an added item from its content through the run's exported content encoder
  (``training.index.content_encoder.ContentEncoder``: every facet it yields, engagement and
  semantic, ``[N, D]`` each, as the model would embed an item with no id row yet) and adds it to
  the served MFLI index (``RetrievalIndex.add_items``: posting lists appended, no rebuild);
- drops a removed item from the index and from the popularity fallback;
- records an added item's title, so ``/recommend``, ``/users/{id}/history`` and ``/ui`` name it
  (also once a continued run, ``rayrec train --continue``, has trained it).

Which runs take items: an MFLI run served with its learned index and an exported content
encoder (:func:`unsupported_reason` says why any other cannot). A two-tower run's exact index
has no content path (its item tower reads the id alone, so a new id has no vector), and HSNN
exports no content encoder and its tree has no add path yet.

Items the served run trained are not replaced from content: ``POST /items`` refuses them (409),
and a replayed log (a newer run that has since trained an item added live: a continued MFLI run
reads the catalogue log and trains the live items) skips them, so a trained vector always wins
over a content-only one. Removal applies to any item.

Example::

    catalogue = LiveCatalogue(index, encoder, titles)
    catalogue.apply([ItemChange(9001, "Toy Story (1995)", ("Animation",), 1995)])
    index.serves(9001)                              # True: the next search may return it
    catalogue.apply([ItemChange.removal(9001)])     # gone from the index and the fallback
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from training.data.catalogue_log import ItemChange, content_table, live_state
from serving.retriever import Query, RetrievalIndex

if TYPE_CHECKING:
    from training.index.content_encoder import ContentEncoder

logger = logging.getLogger("ray.serve")


def unsupported_reason(index: RetrievalIndex, encoder: ContentEncoder | None) -> str | None:
    """Why this replica's index cannot take items from content, or None when it can."""
    name = index.backend.name
    if name == "exact":
        served = "retriever_index: exact" if index.meta.model in ("mfli", "hsnn") else f"a {index.meta.model!r} run"
        return (f"the app serves exact search over the run's item vectors ({served}): a new item has no vector "
                "there (the two-tower item tower reads the id alone) and there is no content encoder to make one; "
                "serve an MFLI run with its learned index")  # fmt: skip
    if name == "hsnn":
        return ("the app serves an HSNN index: HSNN runs export no content encoder and the tree has no add path yet; "
                "serve an MFLI run to add items live")  # fmt: skip
    if not index.editable:
        return f"the {name!r} index cannot be edited in place"
    if encoder is None:
        return ("the MFLI run has no exported content encoder (index/mfli/content_encoder/: runs trained before it "
                "existed); retrain it to add items live")  # fmt: skip
    return None


class LiveCatalogue:
    """Applies catalogue changes to one replica's index (module docstring).

    Args:
        index: the replica's retrieval index (its backend editable: MFLI).
        encoder: the run's exported content encoder.
        titles: the replica's item_id → title map, updated in place for added items.

    Not thread safe by itself: the Ingress applies changes from one task, one batch at a time
    (in a worker thread); the index's own lock keeps searches out while it is edited.
    """

    def __init__(self, index: RetrievalIndex, encoder: ContentEncoder, titles: dict[int, str]) -> None:
        self.index = index
        self.encoder = encoder
        self.titles = titles
        self.trained = frozenset(index.backend.retriever.item_ids().tolist())  # as loaded, before any change
        self._applied: dict[int, ItemChange] = {}  # each item's last change applied here

    def is_trained(self, item_id: int) -> bool:
        """Whether the served run trained this item (its vectors are not replaced from content)."""
        return item_id in self.trained

    def vectors(self, changes: list[ItemChange]) -> dict[str, torch.Tensor]:
        """Facet vectors of added items from their content: facet → ``[N, D_f]``."""
        return self.encoder.encode(content_table(changes))

    def apply(self, changes: Iterable[ItemChange]) -> int:
        """Apply a batch of changes in order (each item's last change wins); returns how many
        changed the index. A change already applied, or an add of a trained item, is skipped."""
        todo = [c for c in live_state(changes).values() if self._applied.get(c.item_id) != c]
        adds = [c for c in todo if not c.removed and not self.is_trained(c.item_id)]
        removals = [c for c in todo if c.removed]
        skipped = len(todo) - len(adds) - len(removals)
        if skipped:
            logger.info("LiveCatalogue: %d items added live are trained by the served run: their trained vectors serve", skipped)
        if removals:
            self.index.remove_items(torch.tensor([c.item_id for c in removals], dtype=torch.int64))
        if adds:
            ids = torch.tensor([c.item_id for c in adds], dtype=torch.int64)  # [N]
            self.index.add_items(ids, self.vectors(adds))
            self.titles.update({c.item_id: c.title for c in adds if c.title is not None})
        # an item added live that a newer run has trained since keeps its live name: the dataset's
        # titles (what the replica starts from) do not have it; a dataset item keeps its own
        for c in todo:
            if not c.removed and c.title is not None and self.is_trained(c.item_id):
                self.titles.setdefault(c.item_id, c.title)
        self._applied.update({c.item_id: c for c in removals + adds})
        return len(removals) + len(adds)

    def replace(self, changes: Iterable[ItemChange]) -> int:
        """Start over from a snapshot (every changed item's last change): items added here that
        it no longer mentions are removed, the rest applied as :meth:`apply` does.

        A removal of a trained item that the snapshot no longer mentions is not undone (its
        vectors are gone from this replica); that takes a lost catalogue log, and a restart.
        """
        state = live_state(changes)
        stale = [i for i, c in self._applied.items() if i not in state and not c.removed]
        if stale:
            self.index.remove_items(torch.tensor(stale, dtype=torch.int64))
            for item_id in stale:
                del self._applied[item_id]
        return len(stale) + self.apply(state.values())

    def added(self) -> list[int]:
        """Items added live and served now."""
        return [i for i, c in self._applied.items() if not c.removed]


def users_served(index: RetrievalIndex, item_id: int, users: list[int], k: int, chunk: int = 256) -> list[int]:
    """Which of ``users`` get ``item_id`` in their top ``k`` from ``index`` now (retrieval,
    seen items excluded, as ``/recommend`` retrieves): who a new item is served to.

    A probe for tests and benchmarks, run on an in-process copy of the served index in the same
    state as the app's (the same changes applied), so "a matching user" is decided by the
    serving code itself rather than by a second scorer that could disagree with the beam search.
    """
    found = []
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        answers = index.search([Query(user, k) for user in batch])
        found += [user for user, answer in zip(batch, answers) if item_id in answer.item_ids]
    return found
