"""Embed brand-new items from their content alone, with no trainer and no sharded tables.

MFLI's index takes new items in real time (:meth:`MFLIIndex.add_items`), but it needs their
facet vectors, and those come from the item tower: MPZCH content tables that live sharded on the
Ray Train workers, plus two MLPs. A serving process or a benchmark has none of that. The
:class:`ContentEncoder` is the item tower's content path cut out at export time:

- per content feature (genre, year, title), the rows of every token the catalogue uses, looked
  up once through the sharded tables (:func:`export_content_encoder`, collective);
- the engagement and semantic item MLPs.

A new item is then embedded exactly as the model would embed it if its id had no row yet: the
semantic facet is the model's own (content only, bit for bit; the test checks it), and the
engagement facet is the engagement MLP over ``[0 ‖ content]``, a zero id row. Why zero rather
than what the MPZCH lookup returns for an unseen id: a read-only lookup of an unseen id falls
back to *another* id's row, so the model's own answer for a new item depends on which item it
collides with; zero is the row of an item nobody has seen, and the content decides the rest.
For the same reason a content token the catalogue never had is skipped rather than given the
row the model's lookup would lend it.
Without the engagement facet a new item would be scored on half of the user's query and lose to
every trained item (``docs/benchmarks/retrieval_synth1m.md`` measured that: cold recall 0).

Files (``index/mfli/content_encoder/``): ``encoder.json`` (sizes), ``tokens.parquet``
(``feature``, ``token``, ``row`` list<float32>), ``mlps.pt`` (the item MLPs' state dict).

Example::

    encoder = ContentEncoder.load(run.mfli_index_dir / "content_encoder")
    vectors = encoder.encode(new_items)        # {"engagement": [N, D], "semantic": [N, D]}
    index.add_items(ids, vectors)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from training.models.item_content import CONTENT_FEATURES, content_tokens, stable_hash
from training.models.mfli import FACETS
from training.models.two_tower import mean_pool, mlp

ENCODER_DIR = "content_encoder"


@dataclass
class ContentEncoder:
    """The content path of MFLI's item tower.

    Args:
        tokens: feature → (token ids ``[T_f]`` int64 ascending, their rows ``[T_f, E]``).
        mlps: ``{"engagement": [B, 4E] → [B, D], "semantic": [B, 3E] → [B, D]}``.
    """

    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]]
    mlps: nn.ModuleDict

    @property
    def embedding_dim(self) -> int:
        return next(iter(self.tokens.values()))[1].shape[1]

    @torch.no_grad()
    def encode(self, items: pa.Table) -> dict[str, torch.Tensor]:
        """Facet vectors of ``items`` (``title``, ``year``, ``genres``), each ``[N, D]`` and
        L2-normalised like the model's. Tokens the catalogue never had are skipped (see the
        module docstring); an item with none gets a zero content block."""
        words = content_tokens(items)
        pooled = [self._pool(name, words[name]) for name in CONTENT_FEATURES]
        content = torch.cat(pooled, dim=1)  # [N, 3E]
        no_id_row = torch.zeros(items.num_rows, self.embedding_dim)
        engagement = self.mlps["engagement"](torch.cat([no_id_row, content], dim=1))
        semantic = self.mlps["semantic"](content)
        return {"engagement": F.normalize(engagement, dim=-1), "semantic": F.normalize(semantic, dim=-1)}

    def _pool(self, name: str, lists: list[list[str]]) -> torch.Tensor:
        """Mean of each item's known token rows ``[N, E]`` (zeros when none is known), pooled
        by the model's own :func:`mean_pool`."""
        known_ids, rows = self.tokens[name]
        lengths = torch.tensor([len(t) for t in lists], dtype=torch.int64)
        ids = torch.from_numpy(stable_hash([t for ts in lists for t in ts]))
        if len(known_ids):
            pos = torch.searchsorted(known_ids, ids).clamp(max=len(known_ids) - 1)
            hit = known_ids[pos] == ids
        else:
            pos, hit = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        owner = torch.repeat_interleave(torch.arange(len(lists)), lengths)
        known_per_item = torch.zeros(len(lists), dtype=torch.int64).index_add_(0, owner, hit.to(torch.int64))
        return mean_pool(JaggedTensor(values=rows[pos[hit]], lengths=known_per_item), len(lists))

    # ------------------------------------------------------------ files
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        features, token_ids, rows = [], [], []
        for name in CONTENT_FEATURES:
            ids, emb = self.tokens[name]
            features += [name] * len(ids)
            token_ids.append(ids.numpy())
            rows.append(emb.numpy().astype(np.float32))
        e = self.embedding_dim
        flat = pa.array(np.concatenate(rows).reshape(-1))
        table = pa.table({
            "feature": pa.array(features, pa.string()),
            "token": pa.array(np.concatenate(token_ids), pa.int64()),
            "row": pa.FixedSizeListArray.from_arrays(flat, e).cast(pa.list_(pa.float32())),
        })  # fmt: skip
        pq.write_table(table, directory / "tokens.parquet")
        torch.save(self.mlps.state_dict(), directory / "mlps.pt")
        sizes = {name: [m.in_features for m in seq if isinstance(m, nn.Linear)] + [seq[-1].out_features]
                 for name, seq in self.mlps.items()}  # fmt: skip
        (directory / "encoder.json").write_text(json.dumps({"embedding_dim": e, "mlp_sizes": sizes}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> ContentEncoder:
        directory = Path(directory)
        meta = json.loads((directory / "encoder.json").read_text())
        mlps = nn.ModuleDict({name: mlp(sizes) for name, sizes in meta["mlp_sizes"].items()})
        mlps.load_state_dict(torch.load(directory / "mlps.pt", weights_only=True))
        mlps.eval()
        table = pq.read_table(directory / "tokens.parquet")
        features = np.asarray(table.column("feature").to_pylist())
        token = table.column("token").to_numpy()
        e = meta["embedding_dim"]
        flat = table.column("row").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        rows = flat.astype(np.float32).reshape(-1, e)
        tokens = {}
        for name in CONTENT_FEATURES:
            pick = np.flatnonzero(features == name)
            order = np.argsort(token[pick], kind="stable")
            tokens[name] = (torch.from_numpy(token[pick][order].copy()), torch.from_numpy(rows[pick][order].copy()))
        return cls(tokens, mlps)


@torch.no_grad()
def export_content_encoder(model, items: pa.Table, chunk: int = 1024) -> ContentEncoder:
    """Cut the content path out of a (sharded) MFLI model: every rank gets the same encoder.

    Collective under DMP: the content tokens of ``items`` are looked up through the model's own
    tables in equal-size calls on every rank (each rank asks for all of them, a few thousand).
    Call it in eval mode (read-only MPZCH), like the rest of the export.
    """
    from training.data.loader import FEATURES

    core = getattr(model, "module", model)
    words = content_tokens(items)
    tokens = {}
    for name in CONTENT_FEATURES:
        ids = torch.from_numpy(np.unique(stable_hash([t for ts in words[name] for t in ts])))
        found_ids, found_rows = [], []
        for lo in range(0, max(len(ids), 1), chunk):
            part = ids[lo : lo + chunk]
            n = len(part)
            lengths = []
            for key in (*FEATURES, *CONTENT_FEATURES):
                lengths.append(torch.ones(n, dtype=torch.int32) if key == name else torch.zeros(n, dtype=torch.int32))
            kjt = KeyedJaggedTensor(keys=[*FEATURES, *CONTENT_FEATURES], values=part, lengths=torch.cat(lengths))
            rows, _ = core.tables(kjt)
            got = rows[name].lengths().to(torch.bool)  # a lookup that drops a token leaves it out
            found_ids.append(part[got])
            found_rows.append(rows[name].values())
        tokens[name] = (torch.cat(found_ids), torch.cat(found_rows).float().cpu())
    # the dense MLPs are plain modules under DMP (only the tables are sharded): copy them
    mlps = copy.deepcopy(nn.ModuleDict({name: core.item_mlps[name] for name in FACETS})).cpu().eval()
    return ContentEncoder(tokens, mlps)
