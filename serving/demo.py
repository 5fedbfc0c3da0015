"""``rayrec demo``: the main job on a fresh machine, end to end, with the wall time of each stage.

prepare ml-100k → start a local single-node Ray → train the two-tower over sharded MPZCH tables
on 2 Ray Train workers → train the multi-task ranker (MBD, value model, foundation model) on 2
workers → deploy the Serve app (retriever, ranker, FM cache and speculative precompute) → query
it over HTTP for three users (shown next to their last rated movies), the first one twice so the
second answer reads the FM features precompute left in the cache → print test Recall@10 /
NDCG@10 and the ranker's AUCs → shut down (or keep serving).
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
    parser.add_argument("--ranker-config", default=str(REPO / "configs" / "ml100k-ranker.yaml"),
                        help="ranker run config (default configs/ml100k-ranker.yaml)")
    parser.add_argument("--ranker-rows", type=int, default=40_000,
                        help="training examples for the ranker (a seeded sample; default 40000, about a minute on "
                             "2 cores; the full ml-100k set is about 300000)")
    parser.add_argument("--no-ranker", action="store_true", help="retrieval only: skip training and serving the ranker")
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

    ranker_dir = None
    if not args.no_ranker:
        with stage("train the ranker (multi-task + MBD + foundation model, 2 Ray Train workers)", timings):
            from training.jobs.train_ranker import run as run_ranker

            ranker_cfg = load_config(args.ranker_config, [f"data.path={dataset}", f"data.max_train_rows={args.ranker_rows}",
                                                          "data.max_eval_groups=600"])  # fmt: skip
            ranker_dir = run_ranker(ranker_cfg, config_stem=Path(args.ranker_config).stem)
            print(f"ranker run folder: {ranker_dir.path}")

    with stage("deploy (Ray Serve)", timings):
        from serving.app import ServingSettings, serve_app

        settings = ServingSettings(ranker_run=str(ranker_dir.path) if ranker_dir else None,
                                   ranker="off" if args.no_ranker else "auto")  # fmt: skip
        url = serve_app(run_dir.path, port=args.port, settings=settings)
        print(f"serving at {url}  (OpenAPI: {url}/docs)")

    with stage("query over HTTP", timings):
        with httpx.Client(base_url=url, timeout=30) as client:
            for n, user_id in enumerate((1, 42, 500, 1, 999_999)):
                if n == 3 and ranker_dir is not None:
                    time.sleep(2.0)  # precompute runs the FM on user 1's candidates meanwhile
                t0 = time.perf_counter()
                reply = client.post("/recommend", json={"user_id": user_id, "k": 5})
                reply.raise_for_status()
                body = reply.json()
                ms = 1000 * (time.perf_counter() - t0)
                flag = f"  [fallback: {body['fallback']}]" if body.get("fallback") else ""
                if body.get("fm_from_cache") is not None:
                    flag += f"  [ranked; FM features from the precompute cache for {body['fm_from_cache']:.0%} of the candidates]"
                print(f"\nuser {user_id}{flag}  ({ms:.0f} ms)")
                if not body.get("fallback"):
                    print("  last rated: " + "; ".join(_last_rated(dataset, user_id)))
                for rank, item in enumerate(body["items"], 1):
                    print(f"  {rank}. {item['title']}  ({item['score']:.3f})")
                if n == 0:  # the user clicks the first recommendation: logged durably
                    event = {"event_id": f"demo-{body['request_id']}", "user_id": 1, "item_id": body["items"][0]["item_id"],
                             "event": "click", "timestamp": int(time.time()), "request_id": body["request_id"]}
                    ack = client.post("/feedback", json={"events": [event]}).raise_for_status().json()
                    print(f"  /feedback: {ack['accepted']} event acknowledged (durable)")
            print(f"\n/readyz: {client.get('/readyz').json()}")

    test = run_dir.read_json(run_dir.eval_path)
    print(f"\ntest (leave-one-out, full ranking over {info['num_items']} items, seen masked): "
          f"Recall@10 {test['test/recall@10']:.4f}  NDCG@10 {test['test/ndcg@10']:.4f}")
    if ranker_dir is not None:
        ranker_test = ranker_dir.read_json(ranker_dir.eval_path)
        aucs = "  ".join(f"{key.split('/')[2]} AUC {value:.3f}" for key, value in ranker_test.items()
                         if key.startswith("test/fm1/") and key.endswith("/auc"))  # fmt: skip
        print(f"ranker test (held-out lists, FM present): {aucs}")
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
