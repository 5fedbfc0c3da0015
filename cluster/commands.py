"""argparse sub-commands of the ``cluster`` package: ``cluster``, ``submit``, ``jobs``, ``k8s``.

Registered by ``cluster/cli.py``. Handlers import ray (and the modules that import it) lazily so
``rayrec --help`` stays fast; each returns the process exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_cluster(subparsers)
    _register_submit(subparsers)
    _register_jobs(subparsers)
    _register_k8s(subparsers)


# ---- rayrec cluster start|stop|status -------------------------------------------------------


def _register_cluster(subparsers: argparse._SubParsersAction) -> None:
    from cluster.local import (
        DEFAULT_DASHBOARD_PORT,
        DEFAULT_GCS_PORT,
        DEFAULT_METRICS_EXPORT_PORT,
    )

    parser = subparsers.add_parser("cluster", help="start, stop or inspect a local Ray head")
    actions = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    start = actions.add_parser("start", help="start a Ray head on this machine (dashboard, job API, metrics)")
    start.add_argument("--host", default="127.0.0.1", help="address the dashboard/job API binds to (default: loopback)")
    start.add_argument("--port", type=int, default=DEFAULT_GCS_PORT, help="GCS port other nodes join (default: %(default)s)")
    start.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT, help="dashboard + Ray Jobs API port (default: %(default)s)")
    start.add_argument("--metrics-export-port", type=int, default=DEFAULT_METRICS_EXPORT_PORT, help="Prometheus metrics port (default: %(default)s)")
    start.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all detected)")
    start.add_argument("--num-gpus", type=int, default=None, help="GPUs the head offers (default: all detected)")
    start.add_argument("--resources", default=None, help='extra custom resources as JSON, e.g. \'{"trainer": 1}\'')
    start.add_argument("--temp-dir", default=None, help="Ray temp dir for this head (default: /tmp/rayrec/head-<port>)")
    start.add_argument("--no-token-auth", action="store_true", help="start without token authentication (not recommended)")
    start.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the head to accept jobs")
    start.set_defaults(handler=_cluster_start)

    for name, handler, help_text in (
        ("stop", _cluster_stop, "stop the head started by `rayrec cluster start` (only that head)"),
        ("status", _cluster_status, "show the head's addresses and `ray status` for it"),
    ):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--port", type=int, default=DEFAULT_GCS_PORT, help="GCS port the head was started with (default: %(default)s)")
        action.add_argument("--temp-dir", default=None, help="temp dir the head was started with, if not the default")
        action.set_defaults(handler=handler)


def _head_temp_dir(args: argparse.Namespace) -> Path:
    from cluster.local import default_temp_dir

    return Path(args.temp_dir) if args.temp_dir else default_temp_dir(args.port)


def _cluster_start(args: argparse.Namespace) -> int:
    from cluster.local import HeadConfig, HeadError, start_head

    config = HeadConfig(
        host=args.host,
        gcs_port=args.port,
        dashboard_port=args.dashboard_port,
        metrics_export_port=args.metrics_export_port,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        resources=json.loads(args.resources) if args.resources else {},
        temp_dir=args.temp_dir,
        token_auth=not args.no_token_auth,
    )
    try:
        info = start_head(config, timeout_s=args.timeout)
    except HeadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Ray head started (pid {info.pid}).")
    print(f"  dashboard:            {info.dashboard_url}")
    print(f"  job submission:       {info.job_submission_address}   (rayrec submit ... --address {info.job_submission_address})")
    print(f"  join a worker node:   ray start --address {info.gcs_address}")
    print(f"  metrics (Prometheus): {info.metrics_url}")
    print(f"  resources:            {_resources_summary(config)}")
    print(f"  logs:                 {info.log_file}")
    print(f"  stop it with:         rayrec cluster stop --port {args.port}" + (f" --temp-dir {args.temp_dir}" if args.temp_dir else ""))
    return 0


def _resources_summary(config) -> str:
    given = {"CPU": config.num_cpus, "GPU": config.num_gpus, **config.resources}
    parts = [f"{name}={value}" for name, value in given.items() if value is not None]
    detected = [name for name, value in given.items() if value is None]
    return ", ".join(parts + [f"{name}=auto-detected" for name in detected])


def _cluster_stop(args: argparse.Namespace) -> int:
    from cluster.local import stop_head

    info = stop_head(_head_temp_dir(args))
    if info is None:
        print(f"no head recorded in {_head_temp_dir(args)}", file=sys.stderr)
        return 1
    print(f"stopped the Ray head (pid {info.pid}, {info.dashboard_url})")
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    from cluster.local import head_status

    info, alive, report = head_status(_head_temp_dir(args))
    if info is None or not alive:
        print(f"no running head recorded in {_head_temp_dir(args)}", file=sys.stderr)
        return 1
    print(f"Ray head running (pid {info.pid})")
    print(f"  dashboard / job submission: {info.dashboard_url}")
    print(f"  GCS address:                {info.gcs_address}")
    print(f"  metrics:                    {info.metrics_url}")
    print(report)
    return 0


# ---- rayrec submit train|serve|command ------------------------------------------------------


def _default_address() -> str:
    # RAY_API_SERVER_ADDRESS is what Ray's own `ray job` CLI reads; honour it the same way.
    address = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith("http") else DEFAULT_JOBS_ADDRESS


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=_default_address(),
        help="Ray Jobs API of the cluster, http://HOST:PORT (default: $RAY_API_SERVER_ADDRESS or %(default)s)",
    )


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    _add_address(parser)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable for the job (repeatable)")
    parser.add_argument("--pip", action="append", default=[], metavar="PACKAGE", help="extra pip package installed for the job (repeatable; constrained by constraints.txt)")
    parser.add_argument("--name", default=None, help="submission id (default: rayrec-<kind>-<name>-<UTC time>)")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs; exit non-zero unless it succeeds")
    parser.add_argument("--dry-run", action="store_true", help="print the submission (entrypoint, runtime_env, metadata) without submitting")
    parser.add_argument(
        "--local-head", action=argparse.BooleanOptionalAction, default=None,
        help="the head runs on this machine, so relative run/data paths are made absolute paths of "
             "this checkout (default: ask the cluster whether its head node has one of this "
             "machine's addresses; a port-forwarded remote cluster is not local)",
    )


def _register_submit(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("submit", help="submit a rayrec job to a Ray cluster (Ray Jobs API)")
    kinds = parser.add_subparsers(dest="submit_command", metavar="KIND", required=True)

    train = kinds.add_parser("train", help="run `rayrec train` on the cluster")
    train.add_argument("--config", required=True, type=Path, help="run config inside the repo, e.g. configs/ml100k.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    train.add_argument("--run-id", default=None, help="run id (default: chosen by `rayrec train`)")
    train.add_argument(
        "--runs-dir",
        default=None,
        help="where the run folder goes: a path or URI every node sees (default for a local head: <repo>/runs)",
    )
    _add_job_options(train)
    train.set_defaults(handler=_submit_train)

    serve = kinds.add_parser("serve", help="deploy `rayrec serve --run RUN` on the cluster (detached)")
    serve.add_argument("--run", required=True, help="run folder or URI the cluster can read, e.g. /abs/runs/<id>")
    serve.add_argument("--host", default="127.0.0.1", help="Serve HTTP bind address on the cluster (default: loopback)")
    serve.add_argument("--port", type=int, default=8000, help="Serve HTTP port (default: %(default)s)")
    serve.add_argument("--index", choices=["auto", "exact", "mfli", "hsnn"], default="auto",
                       help="search backend (see `rayrec serve --help`; default: %(default)s)")
    serve.add_argument("--beam", type=int, default=None, help="beam width of a learned index (default: the saved one)")
    _add_job_options(serve)
    serve.set_defaults(handler=_submit_serve)

    command = kinds.add_parser("command", help="run any command with the same runtime_env, e.g. `-- rayrec data prepare ml-100k`")
    command.add_argument("command", nargs=argparse.REMAINDER, help="the command, after `--`")
    _add_job_options(command)
    command.set_defaults(handler=_submit_command)


def _local_head(args: argparse.Namespace) -> bool:
    """``--local-head`` if given, else the cluster's own answer (:func:`cluster.submit.head_is_local`);
    a cluster that cannot be asked counts as remote (paths are left as written)."""
    from cluster.submit import head_is_local

    if args.local_head is not None:
        return args.local_head
    return bool(head_is_local(args.address))


def _submit_train(args: argparse.Namespace) -> int:
    from cluster.submit import (
        REPO_ROOT,
        ConfigError,
        build_train_job,
        local_data_path_overrides,
        parse_env_vars,
    )

    runs_dir, overrides = args.runs_dir, list(args.overrides)
    try:
        if _local_head(args):
            # The job runs in an uploaded copy of the repo without runs/ and data/: absolute
            # paths keep the run folder and the dataset where this checkout has them.
            runs_dir = runs_dir or str(REPO_ROOT / "runs")
            overrides += local_data_path_overrides(args.config, overrides)
        spec = build_train_job(
            args.config, overrides, args.run_id, runs_dir, parse_env_vars(args.env), args.pip, args.name
        )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # whether every node sees runs_dir and data.path is checked where it matters: by each
    # training worker, on its own node (training.jobs.launch.worker_run)
    return _submit_spec(args, spec)


def _submit_serve(args: argparse.Namespace) -> int:
    from cluster.submit import build_serve_job, parse_env_vars

    run = args.run
    if "://" not in run and _local_head(args):
        run = os.path.abspath(run)  # `runs/<id>` is not in the uploaded copy of the repo
    spec = build_serve_job(run, args.host, args.port, parse_env_vars(args.env), args.pip, args.name,
                           index=args.index, beam=args.beam)
    return _submit_spec(args, spec)


def _submit_command(args: argparse.Namespace) -> int:
    from cluster.submit import build_command_job, parse_env_vars

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        spec = build_command_job(command, parse_env_vars(args.env), args.pip, args.name)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _submit_spec(args, spec)


def _submit_spec(args: argparse.Namespace, spec) -> int:
    from dataclasses import asdict

    if args.dry_run:
        print(json.dumps(asdict(spec), indent=2))
        return 0
    from cluster.jobs import follow
    from cluster.submit import submit

    try:
        submission_id = submit(args.address, spec)
    except (RuntimeError, ConnectionError) as err:  # unreachable cluster, duplicate id, auth
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"submitted {submission_id} to {args.address}")
    print(f"  rayrec jobs status {submission_id} --address {args.address}")
    print(f"  rayrec jobs logs {submission_id} -f --address {args.address}")
    if args.follow:
        return follow(args.address, submission_id)
    return 0


# ---- rayrec jobs list|status|logs|stop ------------------------------------------------------


def _register_jobs(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("jobs", help="list, inspect, follow or stop submitted jobs")
    actions = parser.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="all jobs on the cluster, newest first")
    _add_address(listing)
    listing.set_defaults(handler=lambda args: _jobs_call("list_jobs", args.address))

    for name, help_text in (("status", "status, message and metadata of one job (JSON)"), ("stop", "stop a running job")):
        action = actions.add_parser(name, help=help_text)
        action.add_argument("submission_id", help="the job's submission id")
        _add_address(action)
        function = "job_status" if name == "status" else "stop_job"
        action.set_defaults(handler=lambda args, function=function: _jobs_call(function, args.address, args.submission_id))

    logs = actions.add_parser("logs", help="a job's logs; -f follows and exits non-zero unless it succeeds")
    logs.add_argument("submission_id", help="the job's submission id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    _add_address(logs)
    logs.set_defaults(handler=lambda args: _jobs_call("job_logs", args.address, args.submission_id, args.follow))


def _jobs_call(function: str, *call_args) -> int:
    from cluster import jobs

    try:
        return getattr(jobs, function)(*call_args)
    except (RuntimeError, ConnectionError) as err:  # the SDK's unknown ids, HTTP and connection errors
        print(f"error: {err}", file=sys.stderr)
        return 1


# ---- rayrec k8s render|validate -------------------------------------------------------------


def _register_k8s(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("k8s", help="render and validate the KubeRay manifests in k8s/")
    actions = parser.add_subparsers(dest="k8s_command", metavar="ACTION", required=True)

    render = actions.add_parser(
        "render",
        help="regenerate k8s/base/generated/ (serveConfigV2 from serving/serve_config.yaml, run configs) and print an overlay",
    )
    render.add_argument("--serve-config", type=Path, default=None, help="Serve config to embed (default: serving/serve_config.yaml)")
    render.add_argument("--run-dir", default=None, help="run folder the RayService serves (default: /storage/runs/ml100k, where the RayJob writes)")
    render.add_argument("--overlay", default="local-cpu", help="overlay to print after rendering (default: %(default)s)")
    render.add_argument("--output", type=Path, default=None, help="write the rendered overlay here instead of stdout")
    render.set_defaults(handler=_k8s_render)

    validate = actions.add_parser("validate", help="render every overlay and validate it (CRD schemas, pod specs, serveConfigV2)")
    validate.add_argument(
        "--crds",
        type=Path,
        default=None,
        help="folder of KubeRay CRD YAMLs (default: $RAYREC_KUBERAY_CRDS or ../shared/kuberay-crds next to the repo)",
    )
    validate.add_argument("--overlay", action="append", default=None, help="validate only this overlay (repeatable)")
    validate.set_defaults(handler=_k8s_validate)


def _k8s_render(args: argparse.Namespace) -> int:
    from cluster.manifests import (
        DEFAULT_RUN_DIR,
        ManifestError,
        kustomize_build,
        write_generated,
    )

    try:
        written = write_generated(args.serve_config, args.run_dir or DEFAULT_RUN_DIR)
        rendered = kustomize_build(args.overlay)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files under k8s/base/generated/", file=sys.stderr)
    if args.output:
        args.output.write_text(rendered)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(rendered)
    return 0


def _k8s_validate(args: argparse.Namespace) -> int:
    from cluster.manifest_validation import default_crds_dir, validate_overlays
    from cluster.manifests import ManifestError

    crds = args.crds or default_crds_dir()
    try:
        problems = validate_overlays(crds, args.overlay)
    except ManifestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for overlay, overlay_problems in problems.items():
        status = "ok" if not overlay_problems else f"{len(overlay_problems)} problem(s)"
        print(f"{overlay}: {status}")
        for problem in overlay_problems:
            print(f"  - {problem}")
    return 1 if any(problems.values()) else 0
