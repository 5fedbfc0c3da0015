"""Read a run's serving artifact (``runs/<id>/index/``) into lookup tables keyed by raw ID.

The layout is the contract in docs/architecture.md; ``training.runs.RunDir`` owns the path of
``index/`` and this module owns reading the files inside it:

- ``index.json``: model, dim, counts, version, dataset folder (for titles)
- ``users.parquet``: ``user_id`` int64, ``embedding`` list<float32>  → :class:`UserEmbeddings`
- ``seen.parquet``: ``user_id`` int64, ``item_id`` int64            → :class:`SeenItems`
- ``popularity.parquet``: ``item_id`` int64, ``count`` int64 (desc) → :class:`Popularity`
- ``items.parquet`` is read by ``training.retrieval.ExactRetriever.from_index_dir``.
- a learned index, when the run trained one (``index.json``'s ``model``): ``mfli/`` (read by
  ``training.index.mfli_index.MFLIIndex.load``; its ``content_encoder/`` by
  :func:`load_content_encoder`) or ``hsnn/`` (``HSNNIndex.load`` and
  ``read_user_packs``); :func:`load_backend` picks what answers a known user's query.

Lookups by raw ID go through a sorted ID tensor and ``searchsorted`` (U users → O(B log U) per
batch), not a Python dict over millions of users.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict

from training.retrieval import ExactRetriever, Retriever, read_embedding_table
from training.runs import RunDir
from training.storage import is_remote, join, local_path

IndexName = Literal["exact", "mfli", "hsnn"]
"""A search backend: exact dot-product search, the MFLI learned index or the HSNN tree."""

IndexChoice = Literal["auto", "exact", "mfli", "hsnn"]
"""What to serve: ``auto`` is the learned index the run trained (MFLI or HSNN), else exact."""


class IndexMeta(BaseModel):
    """``index.json``; extra keys are allowed so training can add fields without breaking serving."""

    model_config = ConfigDict(extra="allow")

    model: str
    dim: int
    num_items: int
    num_users: int
    version: str
    dataset: str
    mfli_index: str | None = None  # MFLI runs: the sub-folder of index/ holding the learned index
    hsnn_index: str | None = None  # HSNN runs: the sub-folder holding tree, scorer and user packs


def index_dir(run_dir: str | Path) -> Path:
    """``<run>/index`` on this node: the run's own folder, or this node's mirror of a run in
    object storage (fetched here). Absolute, so Serve replicas, whose cwd differs, find it."""
    return local_path(index_location(run_dir))


def index_location(run_dir: str | Path) -> str:
    """Where any node finds ``<run>/index``: an absolute path or a URI (what replicas get)."""
    return join(RunDir.open(run_dir).location, "index")


def read_meta(index_path: Path) -> IndexMeta:
    return IndexMeta.model_validate(json.loads((index_path / "index.json").read_text()))


def resolve_dataset_dir(meta: IndexMeta, index_path: Path) -> str:
    """The dataset named by ``index.json``: its URI as recorded, or a local folder.

    A relative path is tried against the working directory, then against the project folder
    holding ``runs/`` (``index/`` → run → runs → project), since training writes it relative to
    where it ran. Returns the first that exists, else the path as given.
    """
    if is_remote(meta.dataset):
        return meta.dataset
    dataset = Path(meta.dataset)
    if dataset.is_absolute():
        return str(dataset)
    candidates = [Path.cwd() / dataset, index_path.parent.parent.parent / dataset]
    return str(next((c.resolve() for c in candidates if c.exists()), dataset))


class UserEmbeddings:
    """User tower outputs (or any per-user search input, e.g. HSNN packs) by raw user ID.

    Args:
        user_ids: [U] int64 raw IDs, unique, any order.
        user_emb: [U, D] float32, row i for ``user_ids[i]``.
    """

    def __init__(self, user_ids: torch.Tensor, user_emb: torch.Tensor) -> None:
        self._ids, order = torch.sort(user_ids)  # [U] ascending
        self._emb = user_emb[order].contiguous()  # [U, D]

    @classmethod
    def from_parquet(cls, path: Path) -> UserEmbeddings:
        return cls(*read_embedding_table(path, "user_id"))

    def __len__(self) -> int:
        return self._ids.numel()

    @property
    def dim(self) -> int:
        """Width of a row (D, or D + T for HSNN packs)."""
        return self._emb.shape[1]

    def lookup(self, user_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of a batch of users.

        Args:
            user_ids: [B] int64 raw IDs.

        Returns:
            emb: [B, D] (rows of unknown users are arbitrary: check ``known``).
            known: [B] bool, whether the user has an embedding.
        """
        rows = torch.searchsorted(self._ids, user_ids).clamp_(max=len(self) - 1)  # [B]
        return self._emb[rows], self._ids[rows] == user_ids


class SeenItems:
    """Items each user already rated, as CSR (sorted user IDs, offsets, item IDs).

    Args:
        user_ids: [E] int64, one per (user, item) pair, any order.
        item_ids: [E] int64.
    """

    def __init__(self, user_ids: torch.Tensor, item_ids: torch.Tensor) -> None:
        order = torch.argsort(user_ids, stable=True)
        self._items = item_ids[order]  # [E] grouped by user
        self._users, counts = torch.unique_consecutive(user_ids[order], return_counts=True)  # [S]
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])  # [S + 1]

    @classmethod
    def from_parquet(cls, path: Path) -> SeenItems:
        table = pq.read_table(path, columns=["user_id", "item_id"])
        return cls(
            torch.from_numpy(table.column("user_id").to_numpy().astype(np.int64)),
            torch.from_numpy(table.column("item_id").to_numpy().astype(np.int64)),
        )

    @property
    def users(self) -> torch.Tensor:
        """[S] the raw IDs of users with at least one seen item, ascending."""
        return self._users

    def for_users(self, user_ids: torch.Tensor) -> list[torch.Tensor]:
        """``[seen item IDs of user b for b in batch]``; an empty tensor for users with none."""
        if self._users.numel() == 0:
            return [torch.empty(0, dtype=torch.int64) for _ in range(user_ids.numel())]
        rows = torch.searchsorted(self._users, user_ids).clamp_(max=self._users.numel() - 1)
        found = self._users[rows] == user_ids
        starts = torch.where(found, self._offsets[rows], 0).tolist()
        ends = torch.where(found, self._offsets[rows + 1], 0).tolist()
        return [self._items[s:e] for s, e in zip(starts, ends)]


@dataclass(frozen=True)
class Popularity:
    """Most popular items first (train + valid interaction counts), the cold-start fallback.

    Args:
        item_ids: [P] int64, by count descending.
        counts: [P] int64.
    """

    item_ids: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_parquet(cls, path: Path) -> Popularity:
        table = pq.read_table(path, columns=["item_id", "count"])
        # Re-sort (stable, ties by item ID) rather than trust the file's order.
        table = table.sort_by([("count", "descending"), ("item_id", "ascending")])
        return cls(
            torch.from_numpy(table.column("item_id").to_numpy().astype(np.int64)),
            torch.from_numpy(table.column("count").to_numpy().astype(np.int64)),
        )

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([<=k] item IDs, [<=k] float32 counts as scores)."""
        return self.item_ids[:k], self.counts[:k].to(torch.float32)


@dataclass(frozen=True)
class SearchBackend:
    """What answers a known user's query: a retriever and the per-user input its ``search`` takes.

    Args:
        name: which backend (reported by ``/readyz`` and every ``Recommendation``).
        retriever: anything with the protocol's ``search`` (``training.retrieval.protocol``).
        users: ``search``'s user input by raw user ID: ``[U, D]`` user tower outputs (exact;
            MFLI, whose D is the concatenated facets), or ``[U, D + T]`` packs (HSNN: the user
            vector and the T most recent history items as catalogue rows, from ``hsnn/users.pt``).
        num_items: items the retriever can return (N).
        beam: beam width searched per level; None for exact search.
    """

    name: IndexName
    retriever: Retriever
    users: UserEmbeddings
    num_items: int
    beam: int | None


def learned_index_dir(index_path: Path, meta: IndexMeta) -> tuple[IndexName, Path] | None:
    """The learned index the run trained and its folder, or None for a run with none.

    ``index.json``'s ``model`` says which (the MFLI and HSNN jobs rewrite it after saving the
    index, so a run that says so has one); the folder is the one ``index.json`` names
    (``mfli_index``/``hsnn_index``), or the run folder's default for MFLI.
    """
    if meta.model == "mfli":
        folder = index_path / meta.mfli_index if meta.mfli_index else RunDir(index_path.parent).mfli_index_dir
        return "mfli", folder
    if meta.model == "hsnn":
        if not meta.hsnn_index:
            raise ValueError(f"{index_path / 'index.json'}: an HSNN run without hsnn_index")
        return "hsnn", index_path / meta.hsnn_index
    return None


def resolve_index(index_path: Path, meta: IndexMeta, choice: IndexChoice = "auto") -> tuple[IndexName, Path | None]:
    """Which backend serves ``choice`` for this run, and the learned index's folder (None: exact).

    Raises ``ValueError`` for a learned index the run did not train and ``FileNotFoundError``
    for one ``index.json`` names but the folder lacks: the caller asked for a learned index (or
    the run says it has one), so answering with exact search instead would hide the mistake.
    """
    if choice not in get_args(IndexChoice):
        raise ValueError(f"index must be one of {get_args(IndexChoice)}, got {choice!r}")
    if choice == "exact":
        return "exact", None
    learned = learned_index_dir(index_path, meta)
    if learned is None:
        if choice == "auto":
            return "exact", None
        raise ValueError(
            f"{index_path}: index {choice!r} asked for, but the run trained {meta.model!r} (serve it with 'exact' or 'auto')"
        )
    name, folder = learned
    if choice not in ("auto", name):
        raise ValueError(f"{index_path}: index {choice!r} asked for, but the run trained {name!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: index.json says the run trained {name!r}, but the folder is missing")
    return name, folder


def check_ttt(index_path: Path, name: IndexName, ttt: bool) -> None:
    """Refuse test-time training for a backend other than HSNN (the one that has it)."""
    if ttt and name != "hsnn":
        raise ValueError(f"{index_path}: test-time training (retriever_ttt) needs an HSNN index; this run serves {name!r}")


def load_backend(
    index_path: Path, meta: IndexMeta, choice: IndexChoice = "auto", beam: int | None = None, ttt: bool = False
) -> SearchBackend:
    """Read the backend :func:`resolve_index` picks, with its user input table.

    Args:
        index_path: a run's ``index/`` folder.
        choice: ``auto`` (the learned index the run trained, else exact) or a backend by name.
        beam: overrides the learned index's saved beam width (``index.json`` of ``mfli/``,
            ``hsnn.json``); ignored by exact search.
        ttt: HSNN only: fine-tune a copy of the scorer per request on the training examples
            under the nodes its beam keeps (``training.models.hsnn_ttt``; settings from
            ``hsnn.json``'s ``ttt``, defaults for runs exported before it). Costs about 150 ms
            of CPU per user on ml-100k (docs/benchmarks/hsnn_ttt.md): off by default.
    """
    if beam is not None and beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    name, folder = resolve_index(index_path, meta, choice)
    check_ttt(index_path, name, ttt)
    if name == "exact":
        exact = ExactRetriever.from_index_dir(index_path)
        users = UserEmbeddings.from_parquet(index_path / "users.parquet")
        return SearchBackend("exact", exact, users, exact.num_items, None)
    assert folder is not None
    if name == "mfli":
        from training.index.mfli_index import MFLIIndex

        mfli = MFLIIndex.load(folder, beam=beam)
        users = UserEmbeddings.from_parquet(index_path / "users.parquet")  # [U, D] concatenated facets
        if users.dim != mfli.dim:
            raise ValueError(f"{index_path}: users.parquet has dim {users.dim}, the MFLI index {mfli.dim}")
        return SearchBackend("mfli", mfli, users, len(mfli), mfli.beam)
    from training.index.hsnn_index import HSNNIndex, read_user_packs  # imports torchrec: only when served

    hsnn = HSNNIndex.load(folder, beam=beam)
    users = UserEmbeddings(*read_user_packs(folder))  # [U, D + T] packs
    if ttt:
        from training.models.hsnn_ttt import TTTConfig, TTTPool, TTTRetriever

        settings = json.loads((folder / "hsnn.json").read_text()).get("ttt") or {}
        return SearchBackend("hsnn", TTTRetriever(hsnn, TTTPool.load(folder), TTTConfig(**settings)), users, hsnn.num_items, hsnn.beam)
    return SearchBackend("hsnn", hsnn, users, hsnn.num_items, hsnn.beam)


def load_content_encoder(index_path: Path, meta: IndexMeta):
    """The run's exported content encoder (``<learned index>/content_encoder/``, MFLI runs), or
    None when the run has none (a two-tower or HSNN run, or an MFLI run trained before it).

    Returns a ``training.index.content_encoder.ContentEncoder`` (imported here only when there
    is one: it imports torchrec).
    """
    learned = learned_index_dir(index_path, meta)
    if learned is None or learned[0] != "mfli":
        return None
    from training.index.content_encoder import ENCODER_DIR, ContentEncoder

    directory = learned[1] / ENCODER_DIR
    return ContentEncoder.load(directory) if (directory / "encoder.json").exists() else None


def read_titles(dataset_dir: Path) -> dict[int, str]:
    """item_id → title from the dataset's ``items.parquet`` ({} when the file is missing).

    A dict is fine here: it is built once per replica and looked up k times per request.
    """
    path = dataset_dir / "items.parquet"
    if not path.exists():
        return {}
    table = pq.read_table(path, columns=["item_id", "title"])
    table = table.filter(pc.is_valid(table.column("title")))
    return dict(zip(table.column("item_id").to_pylist(), table.column("title").to_pylist()))
