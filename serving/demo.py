"""``rayrec demo``: the main job on a fresh machine, end to end, with the wall time of each stage.

prepare ml-100k → start a local single-node Ray → train the two-tower over sharded MPZCH tables
on 2 Ray Train workers → deploy the Serve app → query it over HTTP for three users (shown next
to their last rated movies) → print test Recall@10 / NDCG@10 → shut down (or keep serving).
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="The main job: prepare ml-100k, train on local Ray, serve, query, print results.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "ml100k.yaml"), help="run config (default configs/ml100k.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1 (default 8000)")
    parser.add_argument("--keep-serving", action="store_true", help="keep the app up after the demo until Ctrl-C")
    parser.set_defaults(handler=run_demo)


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {name}", flush=True)
    t0 = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - t0
    print(f"== {name}: {timings[name]:.1f}s", flush=True)


def _last_rated(dataset: Path, user_id: int, n: int = 3) -> list[str]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = pq.read_table(dataset / "interactions" / "valid.parquet").filter(pc.field("user_id") == user_id)
    train = pq.read_table(dataset / "interactions" / "train.parquet").filter(pc.field("user_id") == user_id)
    import pyarrow as pa

    both = pa.concat_tables([train, rows]).sort_by([("timestamp", "descending")]).slice(0, n)
    items = pq.read_table(dataset / "items.parquet", columns=["item_id", "title"])
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    return [f"{titles.get(i, i)} ({r:.0f}*)" for i, r in zip(both.column("item_id").to_pylist(), both.column("rating").to_pylist())]


def run_demo(args: argparse.Namespace) -> int:

    import httpx

    from training.log_setup import configure_logging

    configure_logging()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    dataset = Path(cfg.data.path)

    with stage("prepare ml-100k", timings):
        from training.data.movielens import prepare_ml100k

        info = prepare_ml100k(dataset)
        print(f"{info['num_interactions']:,} interactions, {info['num_users']} users, {info['num_items']} items -> {dataset}")

    with stage("start local Ray", timings):
        import ray

        ray.init(include_dashboard=False, log_to_driver=True)
        print(f"Ray {ray.__version__}: {ray.cluster_resources().get('CPU', 0):.0f} CPUs")

    with stage("train (2 Ray Train workers, sharded MPZCH tables)", timings):
        from training.jobs.train_retrieval import run

        run_dir = run(cfg, config_stem=Path(args.config).stem)
        print(f"run folder: {run_dir.path}")

    with stage("deploy (Ray Serve)", timings):
        from serving.app import serve_app

        url = serve_app(run_dir.path, port=args.port)
        print(f"serving at {url}  (OpenAPI: {url}/docs)")

    with stage("query over HTTP", timings):
        with httpx.Client(base_url=url, timeout=30) as client:
            for user_id in (1, 42, 500, 999_999):
                t0 = time.perf_counter()
                reply = client.post("/recommend", json={"user_id": user_id, "k": 5})
                reply.raise_for_status()
                body = reply.json()
                ms = 1000 * (time.perf_counter() - t0)
                flag = f"  [fallback: {body['fallback']}]" if body.get("fallback") else ""
                print(f"\nuser {user_id}{flag}  ({ms:.0f} ms)")
                if not body.get("fallback"):
                    print("  last rated: " + "; ".join(_last_rated(dataset, user_id)))
                for rank, item in enumerate(body["items"], 1):
                    print(f"  {rank}. {item['title']}  ({item['score']:.3f})")
                if user_id == 1:  # the user clicks the first recommendation: logged durably
                    event = {"event_id": f"demo-{body['request_id']}", "user_id": 1, "item_id": body["items"][0]["item_id"],
                             "event": "click", "timestamp": int(time.time()), "request_id": body["request_id"]}
                    ack = client.post("/feedback", json={"events": [event]}).raise_for_status().json()
                    print(f"  /feedback: {ack['accepted']} event acknowledged (durable)")
            print(f"\n/readyz: {client.get('/readyz').json()}")

    test = run_dir.read_json(run_dir.eval_path)
    print(f"\ntest (leave-one-out, full ranking over {info['num_items']} items, seen masked): "
          f"Recall@10 {test['test/recall@10']:.4f}  NDCG@10 {test['test/ndcg@10']:.4f}")
    print("\nwall time per stage:")
    for name, seconds in timings.items():
        print(f"  {seconds:7.1f}s  {name}")
    print(f"  {time.perf_counter() - t_all:7.1f}s  total")

    if args.keep_serving:
        from serving.app import block_until_interrupted

        print(f"\nstill serving at {url}; Ctrl-C to stop", flush=True)
        block_until_interrupted()
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0
