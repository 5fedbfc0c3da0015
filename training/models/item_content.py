"""Item content as id features: genres, release-year bucket and title words per item.

Why a module of its own: MFLI's semantic facet, HSNN's item tower and the content encoder that
embeds new items all read the same tokens, hashed the same way, from the same tables.

Content features are MPZCH-managed id features like the ids (tables ``genre``, ``year``,
``title``, built with :func:`embeddings.tables.build_tables`); strings become int64 with a
stable hash (:func:`stable_hash`). A model looks each item's tokens up itself
(:class:`ItemContent`, plain tensors set on every rank, not state) so batches carry only ids.

Example::

    content = ItemContent.from_items(pq.read_table("data/ml-100k/items.parquet"))
    kjt = content.lookup(item_ids, present)   # keys CONTENT_FEATURES, one row per batch row
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, Field
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from embeddings.tables import TableSpec
from training.models.two_tower import mean_pool

CONTENT_FEATURES: tuple[str, ...] = ("genre", "year", "title")
YEAR_BUCKET = 5  # release years in 5-year buckets: 1995 and 1997 share a row


class ContentTableSizes(BaseModel):
    """Row counts of the three content tables, shared by every model config that reads item
    content (MFLI's semantic facet, HSNN's item tower), so the sizes are named and checked once.

    Args:
        genre_cardinality: distinct genre names (ml-100k: 19; synth: 8 categories).
        year_cardinality: distinct release-year buckets.
        title_cardinality: distinct title words (synth-1m: 8,192 topic words).
    """

    genre_cardinality: int = Field(64, gt=0)
    year_cardinality: int = Field(64, gt=0)
    title_cardinality: int = Field(8_000, gt=0)


def stable_hash(tokens: list[str]) -> np.ndarray:
    """int64 ids of strings, the same in every process (Python's ``hash`` is salted per run)."""
    out = np.empty(len(tokens), dtype=np.int64)
    for i, token in enumerate(tokens):
        digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


def content_tokens(items: pa.Table) -> dict[str, list[list[str]]]:
    """Per content feature, each item's string tokens (genres, year bucket, title words)."""
    genres = items.column("genres").to_pylist()
    years = items.column("year").to_pylist()
    titles = items.column("title").to_pylist()
    return {
        "genre": [[f"g:{g}" for g in (gs or [])] for gs in genres],
        "year": [[f"y:{(y // YEAR_BUCKET) * YEAR_BUCKET}" if y is not None else "y:unknown"] for y in years],
        "title": [[f"t:{w}" for w in re.findall(r"[a-z0-9]+", (t or "").lower())] for t in titles],
    }


@dataclass
class ItemContent:
    """Each item's content token ids, looked up by raw item id (CSR per feature).

    Args:
        item_ids: ``[N]`` int64 ascending.
        offsets: feature → ``[N + 1]`` int64; values: feature → ``[V_f]`` int64 token ids.
    """

    item_ids: torch.Tensor
    offsets: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]

    @classmethod
    def from_items(cls, items: pa.Table) -> ItemContent:
        """From an ``items.parquet`` table (``item_id``, ``title``, ``year``, ``genres``)."""
        order = np.argsort(items.column("item_id").to_numpy(), kind="stable")
        items = items.take(pa.array(order))
        tokens = content_tokens(items)
        offsets, values = {}, {}
        for name in CONTENT_FEATURES:
            lists = tokens[name]
            lengths = np.array([len(t) for t in lists], dtype=np.int64)
            offsets[name] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
            values[name] = torch.from_numpy(stable_hash([t for ts in lists for t in ts]))
        ids = torch.from_numpy(items.column("item_id").to_numpy().astype(np.int64))
        return cls(ids, offsets, values)

    def lookup(self, item_ids: torch.Tensor, present: torch.Tensor) -> KeyedJaggedTensor:
        """Content KJT (keys ``CONTENT_FEATURES``) for ``B`` rows.

        Args:
            item_ids: ``[n]`` ids of the rows that have an item; present: ``[B]`` bool, n True.
        Unknown items get no tokens.
        """
        if len(self.item_ids) == 0:  # no content known: every row gets empty lists
            lengths = torch.zeros(len(CONTENT_FEATURES) * present.shape[0], dtype=torch.int32)
            return KeyedJaggedTensor(keys=list(CONTENT_FEATURES), values=torch.empty(0, dtype=torch.int64), lengths=lengths)
        pos = torch.searchsorted(self.item_ids, item_ids).clamp(max=len(self.item_ids) - 1)
        found = self.item_ids[pos] == item_ids
        lengths, values = [], []
        for name in CONTENT_FEATURES:
            start = self.offsets[name][pos]
            per_item = torch.where(found, self.offsets[name][pos + 1] - start, 0)  # [n]
            row_lengths = torch.zeros(present.shape[0], dtype=torch.int64)
            row_lengths[present] = per_item
            idx = torch.repeat_interleave(start, per_item) + (
                torch.arange(int(per_item.sum())) - torch.repeat_interleave(torch.cumsum(per_item, 0) - per_item, per_item)
            )
            lengths.append(row_lengths)
            values.append(self.values[name][idx])
        return KeyedJaggedTensor(
            keys=list(CONTENT_FEATURES), values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32)
        )

    def attach(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """``kjt`` with the content features of the items in its ``item_id`` rows appended (what a
        model's tables then embed; rows without an item get empty lists)."""
        item_jt = kjt["item_id"]
        return KeyedJaggedTensor.concat([kjt, self.lookup(item_jt.values(), item_jt.lengths() > 0)])


def pool_content(rows: dict[str, JaggedTensor], batch_size: int) -> torch.Tensor:
    """Each content feature's mean table row, concatenated: ``[B, 3E]`` (zeros where a row has no token)."""
    return torch.cat([mean_pool(rows[name], batch_size) for name in CONTENT_FEATURES], dim=1)


def content_table_specs(cfg: ContentTableSizes) -> list[TableSpec]:
    """The three content tables (``genre``, ``year``, ``title``) of a model config (a
    :class:`ContentTableSizes` that also has ``embedding_dim`` and ``tables``)."""
    common = cfg.tables.spec_kwargs(cfg.embedding_dim)
    return [
        TableSpec(name="genre", features=["genre"], cardinality=cfg.genre_cardinality, **common),
        TableSpec(name="year", features=["year"], cardinality=cfg.year_cardinality, **common),
        TableSpec(name="title", features=["title"], cardinality=cfg.title_cardinality, **common),
    ]
