"""``rayrec serve``: deploy a run folder's index behind HTTP.

Ray and Serve are imported inside the handler so ``rayrec --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Serve a trained run's index over HTTP (Ray Serve): POST /recommend, /docs",
        description=(
            "Deploy the run's index/ (top-k retrieval: the run's learned index, MFLI or HSNN, "
            "else exact search; popularity fallback for unknown users) as a Ray Serve app. "
            "Without --detach it starts a local Ray, serves until Ctrl-C and shuts down; with "
            "--detach it deploys to the running Ray cluster (RAY_ADDRESS, or `ray start --head` "
            "first) and returns."
        ),
    )
    parser.add_argument("--run", required=True, metavar="PATH", help="run folder, e.g. runs/<run-id>")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument(
        "--feedback-dir",
        default=None,
        metavar="PATH",
        help="where POST /feedback events are logged as Parquet (default: ./data/feedback)",
    )
    parser.add_argument(
        "--ranker-run",
        default=None,
        metavar="PATH",
        help="a ranker run folder (with ranker/) to rank the retrieved candidates; default: --run's own ranker/, if any",
    )
    parser.add_argument(
        "--index",
        choices=["auto", "exact", "mfli", "hsnn"],
        default="auto",
        help="search backend: auto (default) serves the learned index the run trained (MFLI or HSNN), "
        "else exact search; exact forces exact search on any run",
    )
    parser.add_argument(
        "--beam",
        type=int,
        default=None,
        metavar="N",
        help="beam width of a learned index (default: the width saved with the index; wider = closer to exact, slower)",
    )
    parser.add_argument(
        "--ttt",
        action="store_true",
        help="HSNN runs: test-time training per request (fine-tunes a copy of the scorer on the training examples "
        "under the nodes the beam keeps; ~150 ms of CPU per user on ml-100k, see docs/benchmarks/hsnn_ttt.md)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="return after deploying instead of blocking until Ctrl-C (needs a running Ray cluster)",
    )
    parser.set_defaults(handler=run_serve)


def example_curl(url: str) -> str:
    body = json.dumps({"user_id": 1, "k": 10})
    return f"curl -s -X POST {url}/recommend -H 'content-type: application/json' -d '{body}'"


def run_serve(args: argparse.Namespace) -> int:
    from serving.app import ServingSettings, block_until_interrupted, serve_app
    from serving.run_index import check_ttt, index_dir, read_meta, resolve_index
    from training.log_setup import configure_logging, init_ray, quiet_serve_logger, where_logs_are

    index_path = index_dir(args.run)
    try:  # a wrong --index or --ttt fails here, not in a replica that Serve retries
        name, _ = resolve_index(index_path, read_meta(index_path), args.index)
        check_ttt(index_path, name, args.ttt)
    except (ValueError, FileNotFoundError) as err:
        print(f"rayrec serve: {err}", file=sys.stderr)
        return 2
    configure_logging()
    if args.detach:
        init_ray(address="auto")  # the app must outlive this process: deploy to a running cluster
    else:
        init_ray()
    quiet_serve_logger()
    settings = ServingSettings(feedback_dir=args.feedback_dir, ranker_run=args.ranker_run, retriever_index=args.index,
                               retriever_beam=args.beam, retriever_ttt=args.ttt)
    url = serve_app(args.run, host=args.host, port=args.port, blocking=False, settings=settings)
    print(f"rayrec serving {args.run} at {url}  (docs: {url}/docs)")
    print(example_curl(url))
    print(where_logs_are(), flush=True)
    if not args.detach:
        print("Ctrl-C to stop.", flush=True)
        block_until_interrupted()
    return 0
