"""Score a two-tower checkpoint on the day after it was trained, one protocol for every arm.

Why not the job's own validation: the arms of ``bench_continual.py --parts days`` train on
different data (one day, all days so far, day 0 only), and the job takes the eval histories
and the seen mask from whatever it trained on, so its numbers would differ by protocol as well
as by model. Serving reads a user's history live from the log whatever the model, so here
every arm is scored the same way, in this process, from its committed checkpoint:

- users U: those with an event on day d+1 (at most ``max_users``, drawn with the seed), their
  history the last ``history_len`` items of days 0..d, their seen mask every item of days 0..d;
- candidates C: the catalogue born by the end of day d+1 (new items included);
- served list: the top 10 of C by the model's score, seen items masked, and so are the items
  that hold no row of their own in the model's MPZCH item table (never trained, or evicted):
  an id-only two-tower has no vector for them, and MPZCH's readonly lookup would alias each to
  another id's row (the first measurement filled half the slots with such aliases);
- against the generator's true preference (:class:`PreferenceOracle`, σ(z̄) with the session
  term's previous category from the user's newest item): Recall@10 = share of the user's true
  top 10 (of the same unmasked candidates) served, NDCG@10 with the true preference as gain;
- against next-day events: Recall@10 / NDCG@10 of the user's first event on day d+1 on an
  item not seen on days 0..d (users without one are left out of these two);
- cold-item share: share of the served slots holding an item with no event on days 0..d.

Example::

    truth = DayTruth.build(stream, day=1, history_len=20, max_users=1500, seed=0)
    truth.score(latest_checkpoint(run), load_config(run.config_path))  # {"true_recall@10": ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from churn_days import ChurnStream, next_day_targets, read_stream
from training.data.loader import to_kjt, user_histories
from training.data.synth_world import PreferenceOracle

K = 10


@dataclass
class DayTruth:
    """What day d+1 asks of a model trained through day d, fixed before any arm is scored.

    Args:
        histories: ``[U]`` user_id + history (days 0..d, oldest first).
        candidates: ``[C]`` raw item ids born by the end of day d+1.
        seen: ``[U, C]`` bool, the candidate is in the user's days 0..d.
        gain: ``[U, C]`` true preference σ(z̄) of each pair.
        truth_top: ``[U, K]`` candidate positions of each user's true top K (seen masked).
        target: ``[U]`` candidate position of the next-day event, -1 where none.
        cold: ``[C]`` bool, no event on days 0..d.
        popularity: ``[C]`` events on days 0..d.
    """

    histories: pa.Table
    candidates: np.ndarray
    seen: np.ndarray
    gain: np.ndarray
    truth_top: np.ndarray
    target: np.ndarray
    cold: np.ndarray
    popularity: np.ndarray

    @classmethod
    def build(cls, stream: ChurnStream, day: int, history_len: int, max_users: int, seed: int,
              oracle: PreferenceOracle | None = None) -> DayTruth:  # fmt: skip
        """The users, candidates and truth of scoring day ``day``'s models on day ``day + 1``."""
        oracle = oracle or PreferenceOracle(stream.stream_dir)
        events, day_of = read_stream(stream.stream_dir, stream.clicks)
        before = events.filter(pa.array(day_of <= day))
        tomorrow = events.filter(pa.array(day_of == day + 1))
        users = np.unique(tomorrow.column("user_id").to_numpy())
        if users.size > max_users:
            users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
        candidates = pq.read_table(stream.folders[day] / "items.parquet", columns=["item_id"]).column(0).to_numpy()
        position = {int(i): p for p, i in enumerate(candidates)}

        hist = user_histories(before.select(["user_id", "item_id", "timestamp"]), history_len)
        has = dict(zip(hist.column("user_id").to_pylist(), hist.column("history").to_pylist()))
        histories = pa.table({"user_id": pa.array(users, pa.int64()),
                              "history": pa.array([has.get(int(u), []) for u in users], pa.list_(pa.int64()))})
        row = {int(u): r for r, u in enumerate(users)}
        seen = np.zeros((users.size, candidates.size), dtype=bool)  # [U, C]
        for u, i in zip(before.column("user_id").to_pylist(), before.column("item_id").to_pylist()):
            if u in row and i in position:
                seen[row[u], position[i]] = True

        newest = np.array([h[-1] if h else -1 for h in histories.column("history").to_pylist()], dtype=np.int64)
        previous = np.full(users.size, -1, dtype=np.int8)
        previous[newest >= 0] = oracle.category(newest[newest >= 0])
        pairs_u = np.repeat(users, candidates.size)  # [U*C]
        pairs_i = np.tile(candidates, users.size)
        gain = oracle.preference(pairs_u, pairs_i, np.repeat(previous, candidates.size)).reshape(users.size, -1)
        truth_top = top_k(np.where(seen, -np.inf, gain), K)

        target = np.full(users.size, -1, dtype=np.int64)
        for u, i in zip(*(next_day_targets(before, tomorrow).column(c).to_pylist() for c in ("user_id", "item_id"))):
            if u in row and i in position:
                target[row[u]] = position[i]
        seen_ids, counts = np.unique(before.column("item_id").to_numpy(), return_counts=True)
        popularity = np.zeros(candidates.size)
        known = np.isin(candidates, seen_ids)
        popularity[known] = counts[np.searchsorted(seen_ids, candidates[known])]
        return cls(histories, candidates, seen, gain, truth_top, target, ~known, popularity)

    def score(self, checkpoint: Path, run_cfg) -> dict[str, float]:
        """Load ``checkpoint`` into a single-process two-tower and score its served top 10."""
        from training.export import own_row_mask

        model = load_two_tower(checkpoint, run_cfg)
        own_row = own_row_mask(model, self.candidates)  # [C]: what the model's export would index
        with torch.no_grad():
            _, items = model(to_kjt(pa.table({"item_id": pa.array(self.candidates, pa.int64())}), present=["item_id"]))
            user, _ = model(to_kjt(self.histories, present=["user_id", "history"]))
        scores = (user @ items.T).numpy()  # [U, C]
        return self.metrics(top_k(np.where(self.seen | ~own_row[None, :], -np.inf, scores), K))

    def references(self, seed: int) -> dict[str, dict[str, float]]:
        """What no model needs: the most popular unseen items of days 0..d (ties at random) and a
        random unseen top 10, scored like an arm (the floor the arms are read against)."""
        noise = np.random.default_rng(seed).random(self.seen.shape)  # [U, C]
        return {"popularity": self.metrics(top_k(np.where(self.seen, -np.inf, self.popularity[None, :] + noise * 1e-3), K)),
                "random": self.metrics(top_k(np.where(self.seen, -np.inf, noise), K))}

    def metrics(self, served: np.ndarray) -> dict[str, float]:
        """The day's figures for served lists ``[U, K]`` (candidate positions, best first)."""
        discount = 1.0 / np.log2(np.arange(K) + 2.0)  # [K]
        rows = np.arange(served.shape[0])[:, None]
        in_truth = (served[:, :, None] == self.truth_top[:, None, :]).any(-1)  # [U, K]
        ideal = self.gain[rows, self.truth_top] @ discount  # [U]
        has = self.target >= 0
        hit = served[has] == self.target[has, None]  # [U', K]
        return {
            "true_recall@10": float(in_truth.mean()),
            "true_ndcg@10": float(np.mean(self.gain[rows, served] @ discount / ideal)),
            "event_recall@10": float(hit.any(-1).mean()),
            "event_ndcg@10": float((hit @ discount).mean()),
            "cold_item_share@10": float(self.cold[served].mean()),
            "truth_cold_share@10": float(self.cold[self.truth_top].mean()),
            "users": int(served.shape[0]),
            "event_users": int(has.sum()),
        }


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's ``k`` highest scores ``[U, k]``, best first."""
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def load_two_tower(checkpoint: Path, run_cfg) -> torch.nn.Module:
    """The run's two-tower, unsharded on CPU, from a committed sharded checkpoint (DCP reshards
    on load), MPZCH in lookup mode; refuses a load whose table identities differ from the saved."""
    from embeddings.tables import identities_digest, set_mpzch_training
    from training.checkpoint import load_checkpoint
    from training.models.two_tower import build_two_tower

    model = build_two_tower(run_cfg.model, torch.device("cpu"))
    state = load_checkpoint(model, None, checkpoint)
    if identities_digest(model) != state["identities"]:
        raise RuntimeError(f"{checkpoint}: MPZCH identities after load differ from the saved ones")
    model.eval()
    set_mpzch_training(model, False)
    return model
