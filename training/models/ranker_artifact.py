"""The ranker's serving artifact: export an unsharded copy, load it, score (user, candidate) pairs.

Serving reads the ranker only through this module (``serving.ranking_models.load_run_models``):
:func:`load_ranker` → :class:`RankerScorer`, whose ``score`` and ``fm_embeddings`` take raw ids
and assemble every other input from the tables saved beside the weights.

Layout (``runs/<id>/ranker/``, written by :func:`export_ranker` at the end of
``training.jobs.train_ranker``; no TorchScript, an unsharded copy)::

    model.pt                 torch.save of the unsharded RankingModel state_dict (id rows,
                             MPZCH identities/metadata, dense weights)
    ranker.json              {"model": RankerModelConfig, "value": ValueConfig, "dense_names",
                              "cohort_sizes", "tasks": {name: kind}, "history_len", "version"}
    user_features.parquet    user_id, dense list<float32>, cohorts list<int64>
    item_features.parquet    item_id, dense, cohorts
    histories.parquet        user_id, history list<int64> (train+valid, newest last)

Notation: N (user, candidate) pairs, F dense features, C cohort features, D_fm FM width.

Example::

    scorer = load_ranker(run.path / "ranker")
    out = scorer.score(user_id, candidate_ids, fm=None)          # RankerOutput, [N] per task
    fm = scorer.fm_embeddings(user_id, candidate_ids)             # [N, D_fm]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embeddings.tables import set_mpzch_training
from training.data.loader import FEATURES, to_kjt
from training.data.feature_index import FeatureIndex, HistoryIndex
from training.data.ranking_examples import FeatureTables
from training.models.ranker import RankerOutput, RankingModel, build_ranking_model
from training.models.ranker_config import RankerModelConfig
from training.models.value import ValueConfig

RANKER_JSON = "ranker.json"
MODEL_FILE = "model.pt"


def export_ranker(
    state_dict: dict[str, torch.Tensor], directory: Path, cfg: RankerModelConfig, value: ValueConfig,
    features: FeatureTables, tasks: dict[str, str], histories: pa.Table, history_len: int, version: str,
) -> None:  # fmt: skip
    """Write the serving artifact (format in the module docstring) from an unsharded state_dict."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, directory / MODEL_FILE)
    features.write(directory)
    pq.write_table(histories, directory / "histories.parquet")
    meta = {
        "model": cfg.model_dump(mode="json"),
        "value": value.model_dump(mode="json"),
        "dense_names": features.dense_names,
        "cohort_sizes": features.cohort_sizes,
        "tasks": tasks,
        "history_len": history_len,
        "version": version,
    }
    (directory / RANKER_JSON).write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class RankerScorer:
    """An unsharded ranker loaded from its artifact: ``score(users, candidates, fm)``.

    Per call it gathers only the pairs' rows from arrays built once at load (features and
    histories by id, :mod:`training.data.feature_index`): O(N), not O(catalogue).

    Args:
        model: the :class:`RankingModel` in eval mode (MPZCH lookups read-only).
        features: user/item features by id; histories: each user's history by id.
        meta: the parsed ``ranker.json``.
    """

    model: RankingModel
    features: FeatureIndex
    histories: HistoryIndex
    meta: dict

    def inputs(self, user_ids: int | np.ndarray, candidates: np.ndarray) -> tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
        """The forward's inputs for N (user, candidate) pairs: KJT, dense ``[N, F]``, cohorts ``[N, C]``.

        ``user_ids``: ``[N]``, or one id for every candidate.
        """
        candidates = np.asarray(candidates, dtype=np.int64)
        users = np.broadcast_to(np.asarray(user_ids, dtype=np.int64), candidates.shape).copy()
        history = self.histories.gather(users)  # [N] list<int64>
        batch = pa.table({"user_id": pa.array(users), "item_id": pa.array(candidates), "history": history})
        dense, cohorts = self.features.assemble(users, candidates)  # [N, F], [N, C]
        return to_kjt(batch, FEATURES), torch.from_numpy(dense), torch.from_numpy(cohorts)

    @torch.no_grad()
    def score(
        self, user_ids: int | np.ndarray, candidates: np.ndarray, fm: torch.Tensor | None = None,
        fm_present: torch.Tensor | None = None,
    ) -> RankerOutput:  # fmt: skip
        """Per-task predictions and MBD stats for N pairs: ``candidates`` ``[N]`` and
        ``user_ids`` ``[N]`` (or one user for all). Pairs of many users score in one forward
        pass: rows do not interact, so the serving ranker scores a whole request batch at once.

        ``fm`` ``[N, D_fm]`` precomputed FM embeddings (rows where ``fm_present`` ``[N]`` is
        False are ignored) or None: every row uses the learned missing embedding.
        """
        kjt, dense, cohorts = self.inputs(user_ids, candidates)
        n = len(candidates)
        if fm is None:
            return self.model(kjt, dense, cohorts)
        present = torch.ones(n, dtype=torch.bool) if fm_present is None else fm_present
        return self.model(kjt, dense, cohorts, fm_keep=present, fm=fm)

    @torch.no_grad()
    def fm_embeddings(self, user_ids: int | np.ndarray, candidates: np.ndarray) -> torch.Tensor:
        """The FM's user–item embeddings ``[N, D_fm]`` for N pairs (what serving precomputes)."""
        if self.model.foundation is None:
            raise ValueError("this ranker was trained without a foundation model")
        kjt, dense, _ = self.inputs(user_ids, candidates)
        rows, _ = self.model.tables(kjt)
        history = rows["history"]
        offsets = torch.zeros(len(candidates) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(history.lengths().to(torch.int64), 0)
        return self.model.foundation(history.values(), offsets, rows["item_id"].values(), dense)[0]


def load_ranker(directory: Path) -> RankerScorer:
    """Load the artifact written by :func:`export_ranker` into an unsharded model on CPU."""
    directory = Path(directory)
    meta = json.loads((directory / RANKER_JSON).read_text())
    if meta["model"].get("mbd", {}).get("signals"):
        # artifacts written before MBD had cohort tables of its own read the ranker's
        meta["model"]["mbd"].setdefault("embeddings", "shared")
    cfg = RankerModelConfig.model_validate(meta["model"])
    model = build_ranking_model(cfg, meta["dense_names"], meta["cohort_sizes"], meta["history_len"], torch.device("cpu"))
    state = torch.load(directory / MODEL_FILE, weights_only=True)
    for name, value in model.state_dict().items():
        if name.startswith(("calibration.", "mbd.target_")):  # older artifacts: identity maps
            state.setdefault(name, value)
    model.load_state_dict(state)
    model.eval()
    set_mpzch_training(model, False)
    features = FeatureTables.read(directory, meta["dense_names"], meta["cohort_sizes"]).index()
    histories = HistoryIndex.from_table(pq.read_table(directory / "histories.parquet"))
    return RankerScorer(model, features, histories, meta)
