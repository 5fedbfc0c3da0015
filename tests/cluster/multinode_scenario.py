"""Prove a run on several Ray nodes that share nothing but object storage.

On one machine: a Ray cluster of a head and worker nodes (``ray.cluster_utils.Cluster``), each
node with its own cache folder (``RAYREC_CACHE_DIR``: the only local disk it writes), and an
S3-compatible server on loopback (``moto``). Then, as a user on a real cluster would:

1. the dataset goes to ``s3://…/data`` (``rayrec`` reads it from there on every node);
2. a 2-worker two-tower run trains with ``runs_dir=s3://…/runs``, one worker per node
   (custom resource ``trainer`` + ``STRICT_SPREAD``); checkpoints go to the bucket;
3. mid-epoch, after a checkpoint was committed, one training node is killed (all its
   processes); a replacement node joins (what an autoscaler does), Ray Train restarts the
   worker group from the checkpoint in the bucket and the run finishes;
4. every node's and the driver's cache is wiped, a serving node that never trained joins,
   and the app is deployed from the ``s3://`` run with every replica pinned to that node;
   one ``POST /recommend`` answers over HTTP.

Prints one JSON object of what it saw (``tests/cluster/test_multinode.py`` asserts on it;
docs/cluster.md shows a run). Usage::

    python -m tests.cluster.multinode_scenario --dataset data/ml-100k --workdir /tmp/multinode
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="a local rayrec dataset folder to upload (e.g. data/ml-100k)")
    parser.add_argument("--workdir", required=True, help="scratch folder: one cache folder per node, Ray logs")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"), help="the two-tower run config")
    args = parser.parse_args(argv)

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    # this cluster's session files (and its "current cluster" address file) stay out of the
    # default /tmp/ray, so a plain ray.init() elsewhere on the machine never finds and joins it;
    # a short path, since Ray's Unix sockets live under it (108-byte limit)
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rr-mn-", dir="/tmp"))
    caches = {name: work / f"cache-{name}" for name in ("driver", "head", "train-a", "train-b", "train-c", "serve")}
    os.environ["RAYREC_CACHE_DIR"] = str(caches["driver"])
    sys.path.insert(0, str(REPO))
    from tests.s3_server import s3_server

    with s3_server() as s3_env:
        return _scenario(args, work, caches, s3_env)


def _scenario(args: argparse.Namespace, work: Path, caches: dict[str, Path], s3_env: dict[str, str]) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from training import storage
    from training.config import load_config
    from training.jobs.train_retrieval import run as train
    from tests.waiting import wait_for
    from training.runs import RunDir

    seen: dict[str, Any] = {"timings_s": {}}
    t0 = time.perf_counter()

    def node_env(name: str) -> dict[str, str]:
        return {"RAYREC_CACHE_DIR": str(caches[name]), "PYTHONPATH": str(REPO)}

    def add_node(name: str, **resources: float):
        return cluster.add_node(num_cpus=2, resources=resources, env_vars=node_env(name))

    # 1. the dataset in the bucket
    data_uri = "s3://rayrec/data/ml-100k"
    storage.upload(Path(args.dataset), data_uri)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": node_env("head")})
    nodes = {name: add_node(name, trainer=1) for name in ("train-a", "train-b")}
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    seen["timings_s"]["cluster_up"] = round(time.perf_counter() - t0, 1)

    # 2. train with runs in the bucket, one worker per node
    run_id = "multinode"
    cfg = load_config(args.config, [
        f"data.path={data_uri}",
        "runs_dir=s3://rayrec/runs",
        "train.epochs=3",
        "train.batch_size=64",
        "train.max_steps_per_epoch=60",
        "scaling.resources_per_worker={trainer: 1}",
        "scaling.placement_strategy=STRICT_SPREAD",
        "failure.max_failures=2",
    ])
    run = RunDir.open(storage.join(cfg.runs_dir, run_id))
    killed: dict[str, Any] = {}

    def heartbeat(node: str, rank: int) -> dict | None:
        # heartbeats are node-local files; the check reads them only to time the kill
        path = storage.mirror_path(run.location).relative_to(caches["driver"])
        try:
            return json.loads((caches[node] / path / "workers" / f"rank-{rank}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def registered() -> int:
        try:
            snapshot = json.loads(storage.read_bytes(storage.join(run.location, "checkpoint_manager_snapshot.json")))
        except (FileNotFoundError, ValueError, OSError):
            return 0
        return len(snapshot.get("checkpoint_results", []))

    def ready():
        # the node holding rank 1 dies in epoch 1, past step 10, once epoch 0's checkpoint is registered
        for node in ("train-a", "train-b"):
            beat = heartbeat(node, 1)
            if beat and beat.get("phase") == "train" and beat["epoch"] >= 1 and beat["step"] >= 10 and registered() >= 1:
                return node, beat
        return None

    # training runs in a thread: Ray's node start-up (the replacement node) needs the main thread
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            train(cfg, run_id=run_id)
        except BaseException as err:  # re-raised below, on the main thread
            failure.append(err)

    t_train = time.perf_counter()
    trainer = threading.Thread(target=fit, daemon=True)
    trainer.start()
    node, beat = wait_for(lambda: ready() or (not trainer.is_alive() and ("done", {})), 300, 0.1, "rank 1 mid-way through epoch 1")
    if node != "done":
        cluster.remove_node(nodes[node], allow_graceful=False)
        killed.update(node=node, epoch=beat["epoch"], step=beat["step"], at_s=round(time.perf_counter() - t0, 1))
        nodes["train-c"] = add_node("train-c", trainer=1)  # the replacement an autoscaler would start
    trainer.join()
    if failure:
        raise failure[0]
    seen["timings_s"]["train"] = round(time.perf_counter() - t_train, 1)
    seen["killed"] = killed
    run.pull()
    metrics = list(run.read_metrics())
    seen["resumed"] = [m for m in metrics if m.get("event") == "resumed"]
    seen["epochs_reported"] = [m["epoch"] for m in metrics if "epoch" in m and "event" not in m]
    seen["checkpoints"] = [str(c) for c in run.checkpoints()]
    seen["eval"] = run.read_json(run.eval_path)
    seen["run_objects"] = sorted(
        info.path.split(f"runs/{run_id}/", 1)[1]
        for info in storage.resolve(run.location)[0].get_file_info(
            storage.pafs.FileSelector(storage.resolve(run.location)[1], recursive=True))
        if info.type == storage.pafs.FileType.File and "/checkpoint_" not in "/" + info.path.split(f"runs/{run_id}/", 1)[1]
    )
    seen["worker_node_caches"] = {
        name: sorted(str(p.relative_to(caches[name])) for p in caches[name].glob("s3/rayrec/*/*")) if caches[name].exists() else []
        for name in ("train-a", "train-b", "train-c")
    }

    # 3. serve from the bucket on a node that never trained, with every local copy gone
    for name in ("driver", "head", "train-a", "train-b", "train-c"):
        shutil.rmtree(caches[name], ignore_errors=True)
    serve_node = add_node("serve", serving=10)
    from serving.app import ServingSettings, build_app
    from tests.s3_server import free_port

    port = free_port()
    t_serve = time.perf_counter()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    settings = ServingSettings(replica_resources={"serving": 1}, ranker="off", min_replicas=1, max_replicas=1,
                               feedback_dir=str(work / "feedback"))
    serve.run(build_app(run.location, settings), name="rayrec", route_prefix="/")
    import httpx

    user = int(_first_test_user(caches["driver"], data_uri))
    answer = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": user, "k": 10}, timeout=30)
    seen["timings_s"]["serve"] = round(time.perf_counter() - t_serve, 1)
    seen["recommend"] = {"status": answer.status_code, "body": answer.json()}
    from ray.util.state import list_actors

    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a.class_name.startswith("ServeReplica:")]
    seen["replica_nodes"] = sorted({a.node_id == serve_node.node_id for a in replicas})
    seen["replicas"] = sorted(a.class_name for a in replicas)
    seen["serve_node_cache"] = sorted(str(p.relative_to(caches["serve"])) for p in caches["serve"].glob("s3/rayrec/*/*/*"))
    seen["local_runs_folders"] = [str(p) for p in (Path.cwd() / "runs", work / "runs") if p.exists()]
    seen["timings_s"]["total"] = round(time.perf_counter() - t0, 1)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return seen


def _first_test_user(cache: Path, data_uri: str) -> int:
    import pyarrow.parquet as pq

    from training import storage

    test = storage.local_path(storage.join(data_uri, "interactions", "test.parquet"))
    return int(pq.read_table(test, columns=["user_id"]).column("user_id")[0].as_py())


if __name__ == "__main__":
    print(json.dumps(main(), default=str))
