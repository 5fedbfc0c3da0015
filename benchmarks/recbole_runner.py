"""Train and test one RecBole 1.2.1 model on rayrec's split, once; print one JSON line.

Run by ``.venv-recbole/bin/python`` (RecBole's own environment), never imported by rayrec:
``benchmarks/quality_peers.py`` writes the atomic files and calls this once per (model, seed).

    .venv-recbole/bin/python benchmarks/recbole_runner.py --data-path WORK/plain \
        --dataset rayrec-ml-100k --model BPR --seed 0 --checkpoint-dir WORK/ckpt

The protocol is RecBole's pre-split benchmark mode (``benchmark_filename: [train, valid, test]``),
so RecBole sees exactly rayrec's files: no filtering, no re-splitting. Everything else is RecBole's
default for the model except what the comparison needs (``CONFIG`` below, each line says why).

Sequential models read ``--data-path WORK/seq``, whose rows carry the history before each target
(``item_id_list``), because RecBole does not augment in benchmark mode. RecBole does not mask seen
items for sequential models in full ranking; rayrec does, so :class:`_MaskedTrainer` masks the
same items it masks for the other models: train items on valid, train + valid items on test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# torch >= 2.6 loads checkpoints with weights_only=True; RecBole 1.2.1 pickles its Config into
# every checkpoint and reloads the best one with a plain torch.load, which then fails.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import ModelType, get_model, get_trainer, init_logger, init_seed  # noqa: E402

CONFIG = {
    "benchmark_filename": ["train", "valid", "test"],  # rayrec's own split, used as is
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "metrics": ["Recall", "NDCG"],
    "topk": [10, 50],
    "valid_metric": "NDCG@10",  # early stopping on valid NDCG@10 (RecBole's default is MRR@10)
    "stopping_step": 10,  # RecBole's default, written out: 10 evaluations without improvement
    "eval_step": 1,
    "epochs": 500,  # a ceiling early stopping is meant to reach first; runs that hit it are flagged
    "eval_args": {"order": "TO", "mode": "full", "group_by": "user"},  # full ranking over items
    "show_progress": False,
    "state": os.environ.get("RECBOLE_STATE", "WARNING"),  # INFO shows every epoch
}
SEQUENTIAL = {
    "load_col": {"inter": ["user_id", "item_id", "timestamp", "item_id_list"]},
    "alias_of_item_id": ["item_id_list"],  # the history shares the item vocabulary
    "train_neg_sample_args": None,  # SASRec's default loss is CE over all items: no sampling
}


def _seen_mask(dataset, files: list[str], user_num: int, item_num: int) -> torch.Tensor:
    """``[user_num, item_num]`` bool: items each user has in ``files`` (plain atomic files)."""
    mask = torch.zeros(user_num, item_num, dtype=torch.bool)
    for path in files:
        df = pd.read_csv(path, sep="\t", dtype=str)
        users = dataset.token2id("user_id", df["user_id:token"].to_numpy())
        items = dataset.token2id("item_id", df["item_id:token"].to_numpy())
        mask[torch.as_tensor(users), torch.as_tensor(items)] = True
    return mask


class _TimeCap(Exception):
    """Raised before an epoch that would start after the run's time cap."""


def _trainer_class(base):
    """``base`` plus: seen-item masking for sequential models, a log of every valid score, and
    an optional time cap (``stop_at``, a ``time.perf_counter()``) checked before each epoch."""

    class _MaskedTrainer(base):
        seen_mask: torch.Tensor | None = None
        valid_scores: list = []
        best_valid: dict | None = None
        stop_at: float | None = None

        def _train_epoch(self, *args, **kwargs):
            if self.stop_at is not None and time.perf_counter() > self.stop_at:
                raise _TimeCap
            return super()._train_epoch(*args, **kwargs)

        def _full_sort_batch_eval(self, batched_data):
            interaction, scores, positive_u, positive_i = super()._full_sort_batch_eval(batched_data)
            if batched_data[1] is None and self.seen_mask is not None:  # sequential: RecBole masked nothing
                users = interaction[self.config["USER_ID_FIELD"]].cpu()
                mask = self.seen_mask[users]  # [B, items]
                history = interaction[self.config["ITEM_ID_FIELD"] + self.config["LIST_SUFFIX"]].cpu()  # [B, L]
                assert mask.gather(1, history)[history > 0].all(), "a history item is left unmasked"
                assert not mask[torch.arange(len(users)), positive_i.cpu()].any(), "a target is masked"
                scores[mask.to(scores.device)] = -np.inf
            return interaction, scores, positive_u, positive_i

        def _valid_epoch(self, valid_data, show_progress=False):
            score, result = super()._valid_epoch(valid_data, show_progress=show_progress)
            if not self.valid_scores or score > max(self.valid_scores):
                self.best_valid = dict(result)
            self.valid_scores.append(float(score))
            return score, result

    return _MaskedTrainer


def run(data_path: str, dataset_name: str, model_name: str, seed: int, checkpoint_dir: str,
        plain_path: str | None, time_cap_s: float | None = None, epochs: int | None = None) -> dict:
    """One trained model's best valid and its test result, with epochs and wall time.

    ``time_cap_s``: stop before the first epoch that would start later (default: none, early
    stopping alone ends training); the best checkpoint so far is tested and ``converged`` is False.
    """
    start = time.perf_counter()
    # One thread per run: on a shared 2-core machine two intra-op threads mostly wait on each other.
    torch.set_num_threads(int(os.environ.get("RECBOLE_THREADS", "1")))
    sequential = get_model(model_name).type == ModelType.SEQUENTIAL
    overrides = {"data_path": data_path, "seed": seed, "checkpoint_dir": checkpoint_dir, **CONFIG,
                 **(SEQUENTIAL if sequential else {}), **({"epochs": epochs} if epochs else {})}
    config = Config(model=model_name, dataset=dataset_name, config_dict=overrides)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = _trainer_class(get_trainer(config["MODEL_TYPE"], config["model"]))(config, model)
    trainer.valid_scores = []
    trainer.stop_at = None if time_cap_s is None else start + time_cap_s

    if sequential:
        base = os.path.join(plain_path, dataset_name, dataset_name)
        shape = (dataset.user_num, dataset.item_num)
        trainer.seen_mask = _seen_mask(dataset, [f"{base}.train.inter"], *shape)
    capped = False
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    except _TimeCap:
        capped = True
    if sequential:
        trainer.seen_mask = _seen_mask(dataset, [f"{base}.train.inter", f"{base}.valid.inter"], *shape)
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)

    scores = trainer.valid_scores
    best_epoch = int(np.argmax(scores)) + 1 if scores else None
    return {
        "model": model_name, "seed": seed,
        "valid": {k.lower(): float(v) for k, v in (trainer.best_valid or {}).items()},
        "test": {k.lower(): float(v) for k, v in test.items()},
        "epochs_run": len(scores), "best_epoch": best_epoch, "epoch_cap": config["epochs"],
        "converged": not capped and (len(scores) < config["epochs"] or model_name == "ItemKNN"),
        "time_cap_s": time_cap_s,
        "eval_rows": {"valid": len(valid_data._dataset), "test": len(test_data._dataset)},
        "items": int(dataset.item_num) - 1,  # minus RecBole's padding id 0
        "wall_s": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", required=True, help="folder holding DATASET/DATASET.{train,valid,test}.inter")
    parser.add_argument("--plain-path", help="the plain atomic files (sequential models read seen items there)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True, help="RecBole model name, e.g. BPR, SASRec")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--time-cap-min", type=float, help="stop starting epochs after this (default: none)")
    parser.add_argument("--epochs", type=int, help=f"epoch ceiling (default {CONFIG['epochs']}; smoke tests only)")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # RecBole's Config also parses the command line
    result = run(args.data_path, args.dataset, args.model, args.seed, args.checkpoint_dir,
                 args.plain_path or args.data_path,
                 None if args.time_cap_min is None else 60 * args.time_cap_min, args.epochs)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
