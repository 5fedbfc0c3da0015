"""Serving under faults, short versions (``make chaos`` runs the long ones): replicas SIGKILLed
under steady load, and a new checkpoint rolled out under load.

The app is the toy two-tower run with the stand-in ranker and FM (tests/serving/), deployed
declaratively (as ``serve deploy`` and a RayService do) with two replicas of the Ingress (which
retrieves and ranks), two FM workers, and one FMCache and Predictor. Load goes over HTTP
through the retrying client rayrec ships (``serving.client``), on port 8375.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve

from serving.serve_env import shutdown_serve
from serving.app import ServingSettings, deploy_declaratively
from serving.chaos import SteadyLoad, replica_fault
from serving.precompute import PrecomputeSettings
from tests.serving.toy_run import VERSION, ToyRun, write_toy_run

PORT = 8375
NEW_VERSION = "toy-run/epoch-0009"
RATE_PER_S = 20.0


def settings_for(feedback_dir: Path) -> ServingSettings:
    return ServingSettings(
        feedback_dir=str(feedback_dir),
        models_factory="tests.serving.stand_in_models:load_stand_in",
        num_candidates=30,
        min_replicas=2,
        max_replicas=2,
        ingress_num_cpus=0,
        fm_worker_num_cpus=0,
        precompute=PrecomputeSettings(interval_s=0.1, candidates=30, workers=2),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ToyRun, ToyRun]:
    """The serving run and its successor (other weights, a later version)."""
    old = write_toy_run(tmp_path_factory.mktemp("old"))
    new = write_toy_run(tmp_path_factory.mktemp("new"), seed=1)
    meta = new.run_dir / "index" / "index.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": NEW_VERSION}))
    return old, new


@pytest.fixture(scope="module")
def load(ray_session, runs: tuple[ToyRun, ToyRun], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SteadyLoad]:
    old, _ = runs
    url = deploy_declaratively(old.run_dir, settings_for(tmp_path_factory.mktemp("feedback")), port=PORT)
    try:
        with SteadyLoad(url, [int(u) for u in old.user_ids], rate_per_s=RATE_PER_S, concurrency=4) as steady:
            time.sleep(2)  # warm: the predictor fills the cache for the active users
            yield steady
    finally:
        shutdown_serve()


@pytest.mark.parametrize("deployment", ["Ingress"])
def test_a_killed_replica_loses_no_request(load: SteadyLoad, deployment: str) -> None:
    report = replica_fault(load, deployment, after_s=2.0)
    assert report.replicas == 2
    assert report.during.calls > 0 and report.after.calls > 0
    # the survivor answers while Serve replaces the dead one; nothing fails, nothing hangs
    assert report.during.success_rate == 1.0, report.during
    assert report.after.success_rate == 1.0, report.after
    assert report.during.max_ms is not None and report.during.max_ms < 10_000, report.during


def test_a_killed_cache_degrades_to_the_missing_fm_path_and_the_hit_rate_recovers(load: SteadyLoad) -> None:
    # the after window opens 1 s past the replacement: the refill itself is timed by hit_recovered_s
    report = replica_fault(load, "FMCache", after_s=3.0, settle_s=1.0)
    # while the only cache replica is gone the ranking stage ranks without FM instead of waiting
    assert report.during.success_rate == 1.0, report.during
    assert report.during.p99_ms is not None and report.during.p99_ms < 5_000, report.during
    assert report.during.fm_hit_rate is not None and report.during.fm_hit_rate < 0.9, report.during
    # the new, empty cache is refilled by the predictor from live traffic
    assert report.after.fm_hit_rate is not None and report.after.fm_hit_rate >= 0.8, report.after
    assert report.hit_recovered_s is not None and report.hit_recovered_s < report.replaced_s + 3.0


def test_a_killed_predictor_comes_back_and_precompute_resumes(load: SteadyLoad) -> None:
    report = replica_fault(load, "Predictor", after_s=2.0)
    assert report.during.success_rate == 1.0 and report.after.success_rate == 1.0
    assert report.after.fm_hit_rate is not None and report.after.fm_hit_rate >= 0.8, report.after


def test_rolling_out_a_new_checkpoint_under_load_drops_nothing(
    load: SteadyLoad, runs: tuple[ToyRun, ToyRun], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, new = runs
    start = time.monotonic()
    deploy_declaratively(new.run_dir, settings_for(tmp_path_factory.mktemp("feedback-new")), port=PORT)
    done = time.monotonic()
    time.sleep(2)
    during, after = load.window(start, done), load.window(done)
    assert during.calls > 0 and during.success_rate == 1.0, during
    # Retries stay rare, not absent. A stopping replica rejects new requests, but Ray 2.60's
    # routers keep picking it until it has stopped; on this oversubscribed 2-core node (the
    # rollout starts a dozen replica processes next to the serving ones) a request can bounce
    # off it until the 10 s proxy timeout, or sit in a stopping Ingress that is force-killed
    # at its drain timeout (500, "actor died"). The client retries both; users see latency.
    assert during.first_try_rate >= 0.99, during
    assert set(during.versions) <= {VERSION, NEW_VERSION}
    assert after.success_rate == 1.0 and set(after.versions) == {NEW_VERSION}, after
