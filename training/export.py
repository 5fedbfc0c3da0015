"""The serving artifact: what a finished retrieval run leaves in ``runs/<id>/index/``.

Item and user embeddings (Parquet, ``list<float32>``), popularity and seen items; read by
``serving/`` and ``rayrec eval``. Written by rank 0 after a collective embedding pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.config import RetrievalRunConfig
from training.data.loader import user_histories
from training.eval.distributed import embed_rows
from training.runs import RunDir


def own_row_mask(model, item_ids: np.ndarray) -> np.ndarray:
    """``[I]`` bool: which ``item_ids`` hold a row of their own in the model's MPZCH item table
    (collective: :func:`embeddings.tables.held_ids`). What an id-only two-tower can serve: the
    export indexes these, the jobs' valid/test metrics and the continual benchmark rank these,
    so the reported figures are the served index's."""
    from embeddings.tables import held_ids

    return np.isin(item_ids, held_ids(model, "item").numpy())


def own_row_items(model, items: pa.Table) -> pa.Table:
    """The rows of ``items`` that pass :func:`own_row_mask`."""
    return items.filter(pa.array(own_row_mask(model, items.column("item_id").to_numpy())))


def export_index(model, run: RunDir, dataset: str, items: pa.Table, train_valid: pa.Table, cfg: RetrievalRunConfig, version: str) -> None:
    """Write the serving artifact (``index/``): item and user embeddings, popularity, seen.

    ``dataset`` is the dataset's location (absolute path or URI) that ``index.json`` records,
    so a replica on any node finds the titles and splits. A two-tower indexes only the items
    holding a row of their own in its item table (:func:`own_row_items`): a never-trained or
    evicted id would get another id's row, so the id-only model would serve it as a copy of
    some other item; ``index.json`` counts them as ``items_without_row``. MFLI and HSNN (whose
    exports also come through here) embed every item: their item towers read its content."""
    import pyarrow.compute as pc
    import torch.distributed as dist

    catalogue = items.num_rows
    if cfg.kind == "two_tower":  # MFLI's and HSNN's item towers read the item's content as well
        items = own_row_items(model, items)
    item_emb = embed_rows(model, pa.table({"item_id": items.column("item_id")}), ["item_id"], 1024, tower="item")
    hist = user_histories(train_valid, cfg.data.history_len)
    user_emb = embed_rows(model, hist, ["user_id", "history"], 1024, tower="user")
    if dist.get_rank() != 0:
        return
    run.index_dir.mkdir(parents=True, exist_ok=True)
    d = item_emb.shape[1]

    def emb_column(t: torch.Tensor) -> pa.Array:
        flat = pa.array(t.numpy().reshape(-1).astype(np.float32))
        return pa.FixedSizeListArray.from_arrays(flat, d).cast(pa.list_(pa.float32()))

    pq.write_table(pa.table({"item_id": items.column("item_id"), "embedding": emb_column(item_emb)}), run.index_dir / "items.parquet")
    pq.write_table(pa.table({"user_id": hist.column("user_id"), "embedding": emb_column(user_emb)}), run.index_dir / "users.parquet")
    counts = pc.value_counts(train_valid.column("item_id"))
    pop = pa.table({"item_id": counts.field("values"), "count": counts.field("counts").cast(pa.int64())})
    pq.write_table(pop.sort_by([("count", "descending"), ("item_id", "ascending")]), run.index_dir / "popularity.parquet")
    pq.write_table(train_valid.select(["user_id", "item_id"]), run.index_dir / "seen.parquet")
    (run.index_dir / "index.json").write_text(
        json.dumps(
            {
                "model": "two_tower",
                "dim": d,
                "num_items": items.num_rows,
                "items_without_row": catalogue - items.num_rows,
                "num_users": hist.num_rows,
                "version": version,
                "dataset": dataset,
            },
            indent=2,
        )
    )
