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


def export_index(model, run: RunDir, dataset: str, items: pa.Table, train_valid: pa.Table, cfg: RetrievalRunConfig, version: str) -> None:
    """Write the serving artifact (``index/``): item and user embeddings, popularity, seen.

    ``dataset`` is the dataset's location (absolute path or URI) that ``index.json`` records,
    so a replica on any node finds the titles and splits. Only items holding a row of their own
    in the item table are indexed (:func:`embeddings.tables.held_ids`): a never-trained or
    evicted id would get another id's row, so this id-only model would serve it as a copy of
    some other item; ``index.json`` counts them as ``items_without_row``."""
    import pyarrow.compute as pc
    import torch.distributed as dist

    from embeddings.tables import held_ids

    item_emb = embed_rows(model, pa.table({"item_id": items.column("item_id")}), ["item_id"], 1024, tower="item")
    hist = user_histories(train_valid, cfg.data.history_len)
    user_emb = embed_rows(model, hist, ["user_id", "history"], 1024, tower="user")
    own_row = np.isin(items.column("item_id").to_numpy(), held_ids(model, "item").numpy())  # [I]
    if dist.get_rank() != 0:
        return
    items, item_emb = items.filter(pa.array(own_row)), item_emb[torch.from_numpy(own_row)]
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
                "items_without_row": int((~own_row).sum()),
                "num_users": hist.num_rows,
                "version": version,
                "dataset": dataset,
            },
            indent=2,
        )
    )
