"""The ``loop`` part of ``make bench-continual``: one turn of the closed loop on the running app.

Issue #29's loop, every step the product's own: the app serves an MFLI run; new items arrive
(``POST /items``, served at once from their content); users click them from their
recommendations (``POST /feedback``, the events carrying the versions, position and candidate
set size); the sink compacts the log; ``rayrec train --continue`` (``continue_run``) trains the
new version on those clicks, the new items' id rows and their content from the catalogue log
included; the declarative deploy rolls it out; the new version serves the items from their
trained vectors. A client sends ``/recommend`` all along, so the report says what the turn cost
the users (answers other than 200, per phase).

Measured per item: ``created → trained version serves it``, from the ``POST /items`` to the
first ``/recommend`` answer of the new version that holds the item for a user who did not click
it (one the new version's index serves it to: an in-process copy of the new version with the
catalogue log replayed, as a new replica starts). Issue #29 asks for a median within 15 minutes
(content path plus incremental job); the content path alone is the ``new_item`` part.

Who clicks: each item's *matching users* are those whose top ``k`` holds it once added (decided
on an in-process copy of the served index, ``serving.live_items.users_served``); the first
``clickers`` of them click it from their own ``/recommend`` answer, the rest are held out.
"""

from __future__ import annotations

import random
import shutil
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field

from results import row

DATASET = "ml-100k"
SYSTEM = "continual"


class LoopConfig(BaseModel):
    """The ``loop`` part's sizes.

    Args:
        items: new items added live (copies of the content of popular items, ranks 20 on).
        clickers: matching users per item who click it.
        k: items asked for.
        compact_every_s: the sink's WAL → Parquet compaction period (shipped: 30 s).
        epochs: passes of the incremental job over the new clicks (``continual.epochs``).
        overrides: ``--set`` overrides of the incremental job (``continual.replay=4``; none:
            the shipped defaults).
        poll_s / timeout_s: the /recommend polls that look for a trained item after the rollout.
        seed: the background client's users.
    """

    items: int = Field(default=10, ge=1)
    clickers: int = Field(default=4, ge=1)
    k: int = Field(default=10, ge=1)
    compact_every_s: float = Field(default=5.0, gt=0)
    epochs: int = Field(default=2, ge=1)
    overrides: list[str] = Field(default_factory=list)
    poll_s: float = Field(default=0.05, gt=0)
    timeout_s: float = Field(default=60.0, gt=0)
    seed: int = 0


class Traffic:
    """``/recommend`` for random users, one at a time, from a thread, until stopped; counts the
    answers by phase and status (no retries: an error here is one a user would have seen)."""

    def __init__(self, url: str, users: list[int], k: int, seed: int) -> None:
        self.url, self.users, self.k = url, users, k
        self.rng = random.Random(seed)
        self.phase = "serve"
        self.counts: Counter[tuple[str, str]] = Counter()
        self.versions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=30)
        phases: dict[str, dict[str, int]] = {}
        for (phase, status), n in sorted(self.counts.items()):
            phases.setdefault(phase, {})[status] = n
        return {"by_phase": phases, "versions": dict(self.versions)}

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    reply = client.post("/recommend", json={"user_id": self.rng.choice(self.users), "k": self.k})
                    status = str(reply.status_code)
                    if reply.status_code == 200:
                        self.versions[reply.json()["model_version"]] += 1
                except httpx.HTTPError as err:
                    status = type(err).__name__
                self.counts[(phase, status)] += 1
                time.sleep(0.02)


def _copies(dataset: Path, templates: list[int], first_id: int) -> list:
    """New items with the content (title, genres, year) of ``templates``, ids from ``first_id``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from training.data.catalogue_log import ItemChange

    items = pq.read_table(dataset / "items.parquet")
    out = []
    for n, template in enumerate(templates):
        row_ = items.filter(pc.equal(items.column("item_id"), template)).to_pylist()[0]
        out.append(ItemChange(first_id + n, row_["title"], tuple(row_["genres"] or ()), row_["year"]))
    return out


def _click(client: httpx.Client, user: int, item: int, k: int) -> str | None:
    """The user's /recommend, and a click on ``item`` if it is shown; the event id, else None."""
    from serving.client import event_from

    answer = client.post("/recommend", json={"user_id": user, "k": k}).json()
    shown = [i["item_id"] for i in answer["items"]]
    if item not in shown:
        return None
    event = event_from(answer, shown.index(item), "click")
    reply = client.post("/feedback", json={"events": [event]})
    if reply.status_code != 200:
        raise RuntimeError(f"/feedback answered {reply.status_code}: {reply.text}")
    return event["event_id"]


def _wait_compacted(feedback: Path, event_ids: set[str], timeout_s: float) -> None:
    """Until every event id is in a compacted Parquet part (what the incremental job reads)."""
    from training.data.feedback import list_parts, read_parts

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        parts = list_parts(str(feedback))
        if parts and event_ids <= set(read_parts(str(feedback), parts).column("event_id").to_pylist()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{len(event_ids)} clicks not compacted into {feedback} within {timeout_s:.0f} s")


def _served_after(client: httpx.Client, user: int, item: int, version: str, cfg: LoopConfig) -> float | None:
    """Poll /recommend until the new ``version`` answers with ``item`` for ``user``; the time, or None."""
    deadline = time.perf_counter() + cfg.timeout_s
    while time.perf_counter() < deadline:
        answer = client.post("/recommend", json={"user_id": user, "k": cfg.k})
        if answer.status_code == 200:
            body = answer.json()
            if body["model_version"] == version and item in [i["item_id"] for i in body["items"]]:
                return time.perf_counter()
        time.sleep(cfg.poll_s)
    return None


def run_loop(mfli_run: Path, scratch: Path, cfg: LoopConfig, port: int, probe) -> dict[str, Any]:
    """One turn of the loop on a copy of ``mfli_run`` (its continued version is written beside
    the copy, not under runs/); ``probe(run_dir) -> (index, catalogue, dataset)`` builds an
    in-process copy of a replica's index. Returns the measurements."""
    from serving.app import ServingSettings, deploy_declaratively
    from serving.live_items import users_served
    from serving.serve_env import shutdown_serve
    from training.jobs.continue_retrieval import continue_run

    run_dir = scratch / "loop-runs" / mfli_run.name
    shutil.copytree(mfli_run, run_dir, ignore=shutil.ignore_patterns("failpoints", "workers"))
    feedback = scratch / "feedback-loop"
    settings = ServingSettings(feedback_dir=str(feedback), feedback_compact_every_s=cfg.compact_every_s)
    url = deploy_declaratively(run_dir, settings, port=port)
    index, catalogue, dataset = probe(run_dir)
    users = index.seen.users.tolist()
    traffic = Traffic(url, users, cfg.k, cfg.seed)
    traffic.start()
    stages: dict[str, float] = {}
    try:
        changes = _copies(dataset, index.popularity.top(20 + cfg.items)[0].tolist()[20:], 2_000_000)
        catalogue.apply(changes)  # the probe in the state the app will be in
        client = httpx.Client(base_url=url, timeout=60)
        created = time.perf_counter()
        body = {"items": [{"item_id": c.item_id, "title": c.title, "genres": list(c.genres), "year": c.year} for c in changes]}
        reply = client.post("/items", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"/items answered {reply.status_code}: {reply.text}")
        stages["items_post_s"] = time.perf_counter() - created

        traffic.phase = "clicks"
        clicked: dict[int, list[int]] = {}
        matching_before: dict[int, int] = {}
        events: set[str] = set()
        for change in changes:
            matching = users_served(index, change.item_id, users, cfg.k)
            matching_before[change.item_id] = len(matching)
            clicked[change.item_id] = []
            for user in matching[: cfg.clickers]:
                event = _click(client, user, change.item_id, cfg.k)
                if event is not None:
                    clicked[change.item_id].append(user)
                    events.add(event)
        t0 = time.perf_counter()
        _wait_compacted(feedback, events, timeout_s=10 * cfg.compact_every_s + 30)
        stages["compaction_wait_s"] = time.perf_counter() - t0

        traffic.phase = "incremental job"
        t0 = time.perf_counter()
        done = continue_run(str(run_dir), str(feedback), [f"continual.epochs={cfg.epochs}", *cfg.overrides])
        stages["incremental_job_s"] = time.perf_counter() - t0
        if done.run is None:
            raise RuntimeError(f"the incremental job trained nothing: {done.message}")

        traffic.phase = "rollout"
        t0 = time.perf_counter()
        deploy_declaratively(done.run.path, settings, port=port)
        stages["rollout_s"] = time.perf_counter() - t0
        traffic.phase = "after rollout"
        version = client.post("/recommend", json={"user_id": users[0], "k": cfg.k}).json()["model_version"]

        # the new version as a new replica holds it: its index, the catalogue log replayed
        new_index, new_catalogue, _ = probe(done.run.path)
        new_catalogue.apply(changes)
        trained = [c.item_id for c in changes if new_catalogue.is_trained(c.item_id)]
        refused = client.post("/items", json={"items": body["items"][:1]})
        served_after, reached = {}, {}
        for change in changes:
            others = [u for u in users_served(new_index, change.item_id, users, cfg.k) if u not in clicked[change.item_id]]
            reached[change.item_id] = len(others)
            if others:
                at = _served_after(client, others[0], change.item_id, version, cfg)
                served_after[change.item_id] = None if at is None else at - created
        client.close()
    finally:
        result = traffic.stop()
        shutdown_serve()
    return {
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "served_after_s": served_after,
        "clicks": {str(i): len(u) for i, u in clicked.items()},
        "matching_users_before": {str(i): n for i, n in matching_before.items()},
        "events": len(events),
        "trained_items": len(trained),
        "items": len(changes),
        "reached_users_after": {str(i): n for i, n in reached.items()},
        "post_trained_item_status": refused.status_code,
        "traffic": result,
        "parent_version": index.meta.version,
        "version": version,
        "continued_run": done.run.run_id,
    }


def loop_rows(result: dict[str, Any], cfg: LoopConfig) -> list[dict]:
    """The part's rows: per-item time to the trained version, stage times, answers by phase."""
    times = [t for t in result["served_after_s"].values() if t is not None]
    params = {"what": "new_item_trained", "items": len(times), "k": cfg.k, "epochs": cfg.epochs, "index": "mfli"}
    rows = [
        row(SYSTEM, DATASET, "freshness_s", statistics.median(times) if times else None, stat="median", **params),
        row(SYSTEM, DATASET, "freshness_s", max(times) if times else None, stat="max", **params),
    ]
    rows += [row(SYSTEM, DATASET, f"loop_{name}", value, stage=name) for name, value in result["stages_s"].items()]
    for phase, statuses in result["traffic"]["by_phase"].items():
        total = sum(statuses.values())
        rows.append(row(SYSTEM, DATASET, "recommend_not_200", total - statuses.get("200", 0), phase=phase, requests=total))
    return rows


def markdown_section(report: dict) -> list[str]:
    """The ``loop`` part's section of ``continual.md`` ([] when the part was never run)."""
    part = report.get("parts", {}).get("loop")
    if not part:
        return []
    cfg, result = part["config"], part["result"]
    times = [t for t in result["served_after_s"].values() if t is not None]
    stages = result["stages_s"]
    clicked = sum(1 for n in result["clicks"].values() if n)
    lines = [
        "## The loop: new items → clicks → incremental job → rollout, on the running app",
        "",
        f"One turn on a copy of the MFLI run `{part['run']}` (shipped settings but a {cfg['compact_every_s']:.0f} s "
        f"compaction period): {result['items']} new items (`POST /items`, copies of the content of the items "
        f"ranked 20-{19 + result['items']} by popularity, served at once from their content); up to "
        f"{cfg['clickers']} matching users per item (users whose top {cfg['k']} holds it once added, on an in-process "
        f"copy of the served index: {sum(1 for n in result['matching_users_before'].values() if n)} of the items have "
        f"any) click it when their own `/recommend` answer shows it (`POST /feedback`; "
        f"{result['events']} clicks on {clicked} items); the sink compacts; `rayrec train --continue` "
        f"(`continue_run`, {cfg['epochs']} epochs, Ray Train 2 workers on the same Ray as Serve) trains "
        f"`{result['continued_run']}` on the clicks, the items' content read from the catalogue log; the "
        "declarative deploy rolls it out. A client sent `/recommend` for random users all along (no retries).",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name.removesuffix('_s').replace('_', ' ')} | {value} |" for name, value in stages.items()],
        "",
        f"**Created → served by the trained version** (`POST /items` sent → the first answer of "
        f"`{result['version']}` holding the item for a user who did not click it): median "
        f"{statistics.median(times):.1f} s, max {max(times):.1f} s over {len(times)} of {result['items']} items "
        f"(the others reach no non-clicking user's top {cfg['k']} in the new version). Issue #29 asks for a median "
        "within 15 minutes (content path plus incremental job); the content path alone serves an item in "
        "tens of milliseconds (the `new_item` part).",
        "",
        "Users the item reaches (its top-k share) before, on the content vector, and after, on the trained one: "
        + ", ".join(f"{result['matching_users_before'][i]} → {result['reached_users_after'][i]} ({result['clicks'][i]} clicks)"
                    for i in result["clicks"]) + ". "
        "A few clicks move a fresh id row far: the job's in-batch softmax over a handful of new events has "
        "few negatives, so nothing holds the item back from users who did not click it. Replaying older "
        "interactions into the job (`continual.replay`) supplies those negatives, but it costs quality on a "
        "drifting stream (`continual_replay.md`), so it is off by default.",
        "",
        f"The new version trained all {result['trained_items']} of {result['items']} live items (its index holds "
        "them, so a replica replaying the catalogue log keeps their trained vectors; `POST /items` of one now "
        f"answers {result['post_trained_item_status']}).",
        "",
        "| phase | /recommend sent | not 200 |",
        "|---|---|---|",
    ] if times else ["## The loop", "", "No item reached a non-clicking user after the rollout.", ""]
    if times:
        for phase, statuses in result["traffic"]["by_phase"].items():
            total = sum(statuses.values())
            lines.append(f"| {phase} | {total} | {total - statuses.get('200', 0)} |")
        lines += ["", "Answers by version: " + ", ".join(f"`{v}` {n}" for v, n in result["traffic"]["versions"].items()) + ".", ""]
    return lines
