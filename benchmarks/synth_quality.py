"""bench-serve's SOLARIS quality phase: the served app on synthetic data, scored against the
generator's true preference.

Why a second dataset: on the ml-100k replay a request's quality is the rank of one item (the
event's own) among the 10 answers, and the FM moves that rank in a few percent of events, so its
NDCG gain stays inside the noise and "the share of the FM's gain that precompute keeps" has no
denominator. The synthetic data (``training/data/synth.py``) plants a short-term intent term only
an ordered-history model sees, and its :class:`~training.data.synth_world.PreferenceOracle` scores
every item of a served list, so NDCG@10 against it sees any reordering of the ten.

- :func:`prepare`: the dataset (bench-ranking's ``data/synth-ranker``), a two-tower run
  (``configs/synth-two-tower.yaml``) and a ranker run (``configs/synth-ranker.yaml``), each
  trained here with the real jobs only when ``runs/`` holds none.
- :func:`session_traffic`: the synthetic users in ml-100k's arrival pattern. The generator draws
  timestamps uniformly, so its own log has no sessions (the last 300 events are ~300 different
  users) and the precompute predictor, which works from recent activity, would have nothing to
  predict; real traffic comes in sessions, which ml-100k's replay has.
- :class:`TruePreference`: NDCG@10 of a served list for a user.
- :func:`paired_gain`: per user, the FM's NDCG@10 gain in process (same candidates, ranked with no
  FM and with the FM for every candidate); :func:`retained_share`: the share of that gain the
  live precompute hits keep, with a bootstrap interval over users.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from inprocess import ranked_off_and_sync  # benchmarks/inprocess.py
from training.data.synth_world import PreferenceOracle

# the same generator sizes as bench-ranking's synth dataset, so the two benchmarks share one
SYNTH_SIZE = {"users": 3000, "items": 2000, "interactions": 120_000}


def prepare(root: Path, newest_run, newest_ranker_run) -> tuple[Path, Path, Path]:
    """(dataset, two-tower run, ranker run) on ``data/synth-ranker``; the ``newest_*`` finders
    are bench_serving's (runs under ``runs/`` on that dataset, newest first)."""
    from training.config import load_config
    from training.data.synth import generate_synth

    dataset = root / "data" / "synth-ranker"
    generate_synth(dataset, seed=0, **SYNTH_SIZE)  # a no-op when it is there
    run = newest_run(dataset, config="synth-two-tower.yaml")
    ranker_run = newest_ranker_run(dataset)
    if ranker_run is None:
        from training.jobs.train_ranker import run as train_ranker

        print("no synth-ranker ranker run under runs/: training configs/synth-ranker.yaml first", flush=True)
        ranker_run = train_ranker(load_config(root / "configs" / "synth-ranker.yaml", [f"data.path={dataset}"])).path
    return dataset, run, ranker_run


class TruePreference:
    """NDCG@10 of a served list against the user's true preference.

    The gain of an item is σ(z̄) from the oracle, with the session term's "previous exposure" set
    to the newest item of the user's history in the served ranker's artifact (what the FM reads
    at serving time); the ideal DCG is of the user's best 10 items in the whole catalogue, so
    lists of different modes compare on one scale.

    Args:
        dataset: the synth dataset folder.
        ranker_run: the run whose ``ranker/histories.parquet`` the app serves.
    """

    def __init__(self, dataset: Path, ranker_run: Path) -> None:
        self.oracle = PreferenceOracle(dataset)
        histories = pq.read_table(Path(ranker_run) / "ranker" / "histories.parquet")
        newest = [h[-1] for h in histories.column("history").to_pylist()]  # oldest first
        self._previous = dict(zip(histories.column("user_id").to_pylist(), self.oracle.category(np.asarray(newest)).tolist()))
        self._catalogue = pq.read_table(dataset / "items.parquet", columns=["item_id"]).column(0).to_numpy()
        self._discount = 1.0 / np.log2(np.arange(10) + 2.0)
        self._ideal: dict[int, float] = {}

    def _gains(self, user: int, items: np.ndarray) -> np.ndarray:
        previous = np.full(len(items), self._previous.get(user, -1))
        return self.oracle.preference(np.full(len(items), user), items, previous)

    def ndcg(self, user: int, items: list[int]) -> float:
        """NDCG@len(items) (at most 10) of ``items`` in served order."""
        if user not in self._ideal:
            best = np.sort(self._gains(user, self._catalogue))[::-1][:10]
            self._ideal[user] = float(best @ self._discount[: len(best)])
        items = items[:10]
        if not items:
            return 0.0
        dcg = float(self._gains(user, np.asarray(items, dtype=np.int64)) @ self._discount[: len(items)])
        return dcg / self._ideal[user] if self._ideal[user] > 0 else 0.0


def session_traffic(arrivals: list[int], population: list[int], seed: int) -> list[int]:
    """``arrivals`` (a user id per request, e.g. ml-100k's replay) with each distinct user replaced,
    in order of first appearance, by a user drawn without replacement from ``population``.

    Raises:
        ValueError: when ``arrivals`` has more distinct users than ``population``.
    """
    distinct = list(dict.fromkeys(arrivals))
    if len(distinct) > len(population):
        raise ValueError(f"{len(distinct)} distinct arriving users, only {len(population)} to map them to")
    drawn = np.random.default_rng(seed).choice(np.asarray(population), len(distinct), replace=False).tolist()
    mapping = dict(zip(distinct, drawn))
    return [mapping[u] for u in arrivals]


def paired_gain(index: Any, stage: Any, truth: TruePreference, users: list[int], candidates: int) -> dict[int, float]:
    """user → NDCG@10 with the FM minus without it, on the user's retrieval candidates, in process
    (``index``/``stage``: inprocess.load_inprocess's). Without exclude_seen the answer depends on
    the user only, so one number per user is every one of that user's requests."""
    out = {}
    for user in dict.fromkeys(users):
        off, sync = ranked_off_and_sync(index, stage, user, candidates)
        out[user] = truth.ndcg(user, sync) - truth.ndcg(user, off)
    return out


def retained_share(event_users: list[int], event_hits: list[float], gain: dict[int, float], seed: int,
                   boots: int = 2000) -> tuple[float | None, float | None, float | None]:  # fmt: skip
    """(share, 5th, 95th percentile) of the FM gain the served hits keep: Σ h·Δ / Σ Δ over the live
    precompute requests, h = the request's ``fm_from_cache`` (a whole hit ranks exactly as ``sync``,
    a whole miss as ``off``; linear in between), Δ = its user's :func:`paired_gain`. The interval
    resamples users (a user's requests share one Δ, so requests are not independent). None where
    Σ Δ ≤ 0: there is no gain to keep."""
    users = np.asarray(event_users)
    h, d = np.asarray(event_hits, dtype=float), np.asarray([gain[u] for u in event_users])
    if d.sum() <= 0:
        return None, None, None
    distinct = np.unique(users)
    per_user = {u: (float((h[users == u] * d[users == u]).sum()), float(d[users == u].sum())) for u in distinct}
    rng = np.random.default_rng(seed)
    shares = []
    for _ in range(boots):
        pick = rng.choice(distinct, len(distinct), replace=True)
        num, den = sum(per_user[u][0] for u in pick), sum(per_user[u][1] for u in pick)
        if den > 0:
            shares.append(num / den)
    lo, hi = (np.percentile(shares, [5, 95]).tolist() if shares else (None, None))
    return float((h * d).sum() / d.sum()), lo, hi
