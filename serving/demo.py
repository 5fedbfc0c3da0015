"""``rayrec demo``: the main job on a fresh machine, end to end, one line per stage with its wall time.

prepare ml-100k → start a local single-node Ray → train the two-tower over sharded MPZCH tables
on 2 Ray Train workers → train the multi-task ranker (MBD, value model, foundation model) on 2
workers → deploy the Serve app (retriever, ranker, FM cache and speculative precompute) → query
it over HTTP → print test Recall@10 / NDCG@10 and the ranker's AUCs, then the answers: three
users next to their last rated movies, the first one twice so the second answer reads the FM
features precompute left in the cache, and an unknown user, and the link to the page (``/ui``) → shut down (or keep serving).

Training epochs show as progress bars drawn from the workers' records in the run's
``metrics.jsonl`` (``training.progress``); Ray's own output stays in its session log folder,
named on the "start local Ray" line (``rayrec --verbose demo`` shows it here).
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from serving.client import event_from

REPO = Path(__file__).resolve().parent.parent
_CLEAR_LINE = "\r\x1b[2K"  # back to the line's start and erase it (a terminal's stage line)


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


class Stages:
    """The demo's stage lines: ``[i/n] name: 12.3s  note``, one per stage.

    A stage with a body (progress bars) prints its name first and ``done in 12.3s`` after the
    body; one without prints a single line when it ends (on a terminal, the name shows while
    it runs).
    """

    def __init__(self, total: int) -> None:
        self.total, self.count = total, 0
        self.live = sys.stdout.isatty()

    @contextmanager
    def stage(self, name: str, body: bool = False) -> Iterator[dict[str, str]]:
        self.count += 1
        label = f"[{self.count}/{self.total}] {name}"
        if body:
            print(label, flush=True)
        elif self.live:
            print(label + " ...", end="", flush=True)
        out = {"note": ""}
        t0 = time.perf_counter()
        try:
            yield out
        except BaseException:
            if self.live and not body:
                print(flush=True)  # end the unfinished line before the traceback
            raise
        seconds = time.perf_counter() - t0
        note = f"  {out['note']}" if out["note"] else ""
        if body:
            print(f"  done in {seconds:.1f}s{note}", flush=True)
        else:
            print(f"{_CLEAR_LINE if self.live else ''}{label}: {seconds:.1f}s{note}", flush=True)


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


def _ask(client, dataset: Path, with_ranker: bool) -> tuple[list[str], int]:
    """Query the app for a few users; return the answer lines and the number of requests."""
    lines: list[str] = []
    users = (1, 42, 500, 1, 999_999) if with_ranker else (1, 42, 500, 999_999)
    for n, user_id in enumerate(users):
        if with_ranker and n == 3:
            time.sleep(2.0)  # precompute runs the FM on user 1's candidates meanwhile
        t0 = time.perf_counter()
        body = client.post("/recommend", json={"user_id": user_id, "k": 5}).raise_for_status().json()
        ms = 1000 * (time.perf_counter() - t0)
        flag = f"  [fallback: {body['fallback']}]" if body.get("fallback") else ""
        if body.get("fm_from_cache") is not None:
            flag += f"  [ranked; FM features from the precompute cache for {body['fm_from_cache']:.0%} of the candidates]"
        lines.append(f"user {user_id}{flag}  ({ms:.0f} ms)")
        if not body.get("fallback") and user_id not in users[:n]:  # asked again: said above
            lines.append("  last rated: " + "; ".join(_last_rated(dataset, user_id)))
        lines.extend(f"  {rank}. {item['title']}  ({item['score']:.3f})" for rank, item in enumerate(body["items"], 1))
        if n == 0:  # the user clicks the first recommendation: logged durably, and live in their history
            event = event_from(body, position=0, event="click")
            ack = client.post("/feedback", json={"events": [event]}).raise_for_status().json()
            lines.append(f"  /feedback: {ack['accepted']} click on #1 acknowledged (durable; in user 1's history from now on)")
    return lines, len(users)


def run_demo(args: argparse.Namespace) -> int:
    import logging

    import httpx

    from training.log_setup import configure_logging, init_ray, owns_ray, quiet_serve_logger, where_logs_are

    configure_logging(logging.WARNING)  # the stage lines below are the demo's own report
    stages = Stages(5 if args.no_ranker else 6)
    t_all = time.perf_counter()

    from training.config import load_config

    cfg = load_config(args.config, args.overrides)
    dataset = Path(cfg.data.path)

    with stages.stage("prepare ml-100k") as out:
        from training.data.movielens import PREPARE_STEPS, prepare_ml100k
        from training.progress import Bar

        bar = Bar("ml-100k", len(PREPARE_STEPS))
        info = prepare_ml100k(dataset, on_step=lambda index, name: bar.update(index, name))
        if bar.note and bar.live:  # it prepared something: end the bar's line (elsewhere the stage line says it)
            bar.finish("done")
        out["note"] = f"{info['num_interactions']:,} interactions, {info['num_users']:,} users, {info['num_items']:,} items in {dataset}"

    with stages.stage("start local Ray") as out:
        import ray

        init_ray()
        out["note"] = f"Ray {ray.__version__}, {ray.cluster_resources().get('CPU', 0):.0f} CPUs; {where_logs_are()}"

    with stages.stage(f"train the retriever (two-tower over sharded MPZCH tables, {cfg.scaling.num_workers} Ray Train workers)",
                      body=True) as out:  # fmt: skip
        from training.jobs.train_retrieval import run

        run_dir = run(cfg, config_stem=Path(args.config).stem)
        out["note"] = f"run folder: {run_dir.location}"

    ranker_dir = None
    if not args.no_ranker:
        ranker_cfg = load_config(args.ranker_config, [f"data.path={dataset}", f"data.max_train_rows={args.ranker_rows}",
                                                      "data.max_eval_groups=600"])  # fmt: skip
        with stages.stage(f"train the ranker (multi-task + MBD + foundation model, {ranker_cfg.scaling.num_workers} Ray "
                          "Train workers)", body=True) as out:  # fmt: skip
            from training.jobs.train_ranker import run as run_ranker

            ranker_dir = run_ranker(ranker_cfg, config_stem=Path(args.ranker_config).stem)
            out["note"] = f"run folder: {ranker_dir.location}"

    with stages.stage("deploy on Ray Serve") as out:
        from serving.app import ServingSettings, serve_app

        quiet_serve_logger()
        settings = ServingSettings(ranker_run=str(ranker_dir.path) if ranker_dir else None,
                                   ranker="off" if args.no_ranker else "auto")  # fmt: skip
        url = serve_app(run_dir.path, port=args.port, settings=settings)
        out["note"] = f"{url}  (OpenAPI: {url}/docs)"

    with stages.stage("ask over HTTP") as out:
        with httpx.Client(base_url=url, timeout=30) as client:
            answers, requests = _ask(client, dataset, with_ranker=ranker_dir is not None)
            ready = client.get("/readyz").json()
        out["note"] = f"{requests} requests; /readyz: {ready.get('status')}, index {ready.get('index')}"

    test = run_dir.read_json(run_dir.eval_path)
    print(f"\ntest (leave-one-out, full ranking over {info['num_items']:,} items, seen masked): "
          f"Recall@10 {test['test/recall@10']:.4f}  NDCG@10 {test['test/ndcg@10']:.4f}")
    if ranker_dir is not None:
        ranker_test = ranker_dir.read_json(ranker_dir.eval_path)
        aucs = "  ".join(f"{key.split('/')[2]} AUC {value:.3f}" for key, value in ranker_test.items()
                         if key.startswith("test/fm1/") and key.endswith("/auc"))  # fmt: skip
        print(f"ranker test (held-out lists, FM present): {aucs}")
    print(f"total {time.perf_counter() - t_all:.1f}s\n")
    print("\n".join(answers), flush=True)
    # one line: the page that shows the same for any user (serving/ui.py)
    print(f"look at it: {url}/ui" + ("" if args.keep_serving else "  (make demo KEEP_SERVING=1 keeps it up)"), flush=True)

    if args.keep_serving:
        from serving.app import block_until_interrupted

        print(f"\nstill serving at {url}; Ctrl-C to stop", flush=True)
        block_until_interrupted()
    if not owns_ray():  # a cluster shared with others: remove what the demo deployed
        from ray import serve

        serve.shutdown()
    # the demo's own Ray takes Serve down with it (serve.shutdown() first would only add Ray's
    # notices about the tasks of the Serve controller it kills)
    ray.shutdown()
    return 0
