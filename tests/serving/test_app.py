"""The app builder, the Serve config and the CLI, without deploying (no Ray cluster needed)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pydantic
import pytest
import yaml
from ray._common.utils import import_attr
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from serving import cli
from serving.app import ServingArgs, ServingSettings, app_builder, build_app
from tests.serving.toy_run import ToyRun

CONFIG_PATH = Path(__file__).resolve().parents[2] / "serving" / "serve_config.yaml"


@pytest.fixture(scope="module")
def serve_config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(CONFIG_PATH.read_text()))


def test_serve_config_builds_through_serves_own_loader(serve_config: ServeDeploySchema, toy_run: ToyRun) -> None:
    (app_config,) = serve_config.applications
    builder = import_attr(app_config.import_path)
    assert builder is app_builder
    args = {**app_config.args, "run_dir": str(toy_run.run_dir)}
    app = call_user_app_builder_with_args_if_necessary(builder, args)  # what `serve deploy` runs
    assert isinstance(app, Application)


def test_serve_config_rejects_unknown_args(serve_config: ServeDeploySchema, toy_run: ToyRun) -> None:
    builder = import_attr(serve_config.applications[0].import_path)
    with pytest.raises(pydantic.ValidationError, match="max_batch"):
        call_user_app_builder_with_args_if_necessary(builder, {"run_dir": str(toy_run.run_dir), "max_batch": 8})


def test_serve_config_deployments_match_the_builder_defaults(serve_config: ServeDeploySchema) -> None:
    """The YAML overrides build_app's options; drift between them would be silent."""
    defaults = ServingSettings()
    deployments = {d.name: d for d in serve_config.applications[0].deployments}
    assert set(deployments) == {"Ingress"}  # the request path is one deployment
    for name, cpus in (("Ingress", defaults.ingress_num_cpus),):
        d = deployments[name]
        assert d.max_ongoing_requests == defaults.max_ongoing_requests
        assert d.max_queued_requests == defaults.max_queued_requests
        assert d.backpressure_config.status_code == defaults.shed_status
        assert d.backpressure_config.retry_after_s == defaults.retry_after_s
        assert d.graceful_shutdown_timeout_s == defaults.graceful_shutdown_timeout_s
        assert d.ray_actor_options.num_cpus == cpus
        scaling = dict(d.autoscaling_config)
        assert (scaling["min_replicas"], scaling["max_replicas"]) == (defaults.min_replicas, defaults.max_replicas)
        assert scaling["target_ongoing_requests"] == defaults.target_ongoing_requests
        for delay in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            assert scaling[delay] == getattr(defaults, delay), delay
    assert serve_config.http_options.request_timeout_s == defaults.request_timeout_s
    # the Ingress's user_config (batching, ranker_live) comes from the args, not the YAML
    assert "user_config" not in deployments["Ingress"].model_dump(exclude_unset=True)


def test_build_app_fails_early_on_a_folder_without_index(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_app(tmp_path)


def test_serving_args_are_typed() -> None:
    with pytest.raises(pydantic.ValidationError):
        ServingArgs(run_dir="runs/x", max_batch_size=0)
    assert ServingArgs(run_dir="runs/x").max_replicas == 2
    with pytest.raises(pydantic.ValidationError, match="min_replicas"):
        ServingArgs(run_dir="runs/x", max_replicas=1)  # below the default min: a clear error, not Serve's


def test_cli_registers_serve_with_defaults() -> None:
    parser = argparse.ArgumentParser(prog="rayrec")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--run", "runs/abc"])
    assert (args.run, args.host, args.port, args.detach) == ("runs/abc", "127.0.0.1", 8000, False)
    assert args.feedback_dir is None and args.index == "auto"
    assert parser.parse_args(["serve", "--run", "r", "--index", "mfli"]).index == "mfli"
    assert parser.parse_args(["serve", "--run", "r", "--feedback-dir", "/x"]).feedback_dir == "/x"
    assert args.handler is cli.run_serve
    with pytest.raises(SystemExit):
        parser.parse_args(["serve"])  # --run is required


def test_example_curl_posts_json_to_recommend() -> None:
    curl = cli.example_curl("http://127.0.0.1:8311")
    assert "http://127.0.0.1:8311/recommend" in curl and '"user_id": 1' in curl


def test_ranker_stage_is_bound_only_when_the_run_has_one(toy_run: ToyRun) -> None:
    def deployments(app: Application) -> set[str]:
        from ray.serve._private.build_app import build_app as flatten

        return {d.name for d in flatten(app, name="x").deployments}

    def ingress_ranks(app: Application) -> bool:
        from ray.serve._private.build_app import build_app as flatten

        (ingress,) = [d for d in flatten(app, name="x").deployments if d.name == "Ingress"]
        return ingress.init_kwargs["models_run"] is not None and "ranker" in ingress.user_config

    retrieval_only = build_app(toy_run.run_dir)
    assert deployments(retrieval_only) == {"Ingress", "FeedbackSink", "HistoryBoard"} and not ingress_ranks(retrieval_only)
    frozen = build_app(toy_run.run_dir, ServingSettings(live_history=False))  # histories as exported
    assert deployments(frozen) == {"Ingress", "FeedbackSink"}
    with_ranker = ServingSettings(models_factory="tests.serving.stand_in_models:load_stand_in")
    ranked = build_app(toy_run.run_dir, with_ranker)
    assert deployments(ranked) == {"Ingress", "FeedbackSink", "HistoryBoard", "FMCache", "FMWorker", "Predictor"}
    assert ingress_ranks(ranked)
    no_precompute = with_ranker.model_copy(update={"precompute_enabled": False})
    assert deployments(build_app(toy_run.run_dir, no_precompute)) == {"Ingress", "FeedbackSink", "HistoryBoard"}
    assert ingress_ranks(build_app(toy_run.run_dir, no_precompute))
    ranker_run = toy_run.run_dir.parent / "ranker-run"
    (ranker_run / "ranker").mkdir(parents=True, exist_ok=True)
    (ranker_run / "ranker" / "ranker.json").write_text("{}")  # the artifact's marker file
    assert ingress_ranks(build_app(toy_run.run_dir, ServingSettings(ranker_run=str(ranker_run))))
    off = with_ranker.model_copy(update={"ranker": "off"})
    assert deployments(build_app(toy_run.run_dir, off)) == {"Ingress", "FeedbackSink", "HistoryBoard"}
    assert not ingress_ranks(build_app(toy_run.run_dir, off))


def test_stateful_deployments_keep_their_replica_counts_whatever_the_autoscaling(toy_run: ToyRun) -> None:
    """FeedbackSink runs feedback_replicas; FMCache and Predictor exactly one, never autoscaled
    (their docstrings say why two would be wrong); the stateless Ingress autoscales."""
    from ray.serve._private.build_app import build_app as flatten

    settings = ServingSettings(models_factory="tests.serving.stand_in_models:load_stand_in", min_replicas=2,
                               max_replicas=4, feedback_replicas=2)  # fmt: skip
    deployments = {d.name: d for d in flatten(build_app(toy_run.run_dir, settings), name="x").deployments}
    assert deployments["FeedbackSink"].num_replicas == 2
    assert deployments["FeedbackSink"]._deployment_config.autoscaling_config is None
    for name in ("FMCache", "Predictor"):
        assert deployments[name].num_replicas == 1, name
        assert deployments[name]._deployment_config.autoscaling_config is None, name
    assert deployments["Ingress"]._deployment_config.autoscaling_config.min_replicas == 2
    default = {d.name: d for d in flatten(build_app(toy_run.run_dir), name="y").deployments}
    assert default["FeedbackSink"].num_replicas == 1
