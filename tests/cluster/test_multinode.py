"""rayrec on a Ray cluster of several nodes that share nothing but an S3-compatible store.

The scenario (tests/cluster/multinode_scenario.py) runs in its own driver process, since it
starts its own cluster (head + 2 training nodes, then a replacement and a serving node, each
with its own cache folder) beside the session's Ray. What it must show: training on 2 nodes
with data, run folder and checkpoints in ``s3://``; a training node killed mid-epoch and the
run resumed from the bucket on a replacement node; serving from the ``s3://`` run on a node
that never trained after every other node's local copy was deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_train_on_two_nodes_survive_a_node_loss_and_serve_from_object_storage(ml100k_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.cluster.multinode_scenario", "--dataset", str(ml100k_dir), "--workdir", str(tmp_path / "work")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])

    # a training node died mid-epoch 1, after epoch 0's checkpoint was registered ...
    assert seen["killed"]["epoch"] == 1 and seen["killed"]["step"] >= 10
    # ... and the run resumed from the bucket at epoch 1 with the same MPZCH identities, and finished
    assert [(r["epoch"], r["identities_match"]) for r in seen["resumed"]] == [(1, True)]
    assert seen["resumed"][0]["checkpoint"].startswith("rayrec/runs/multinode/checkpoint_")
    assert seen["epochs_reported"][-1] == 2 and set(seen["epochs_reported"]) == {0, 1, 2}
    assert len(seen["checkpoints"]) == 2 and all(c.startswith("s3://rayrec/runs/multinode/") for c in seen["checkpoints"])
    assert seen["eval"]["test/users"] == 943 and seen["eval"]["test/recall@10"] > 0.02
    # everything a run folder holds went to the bucket (heartbeats and fail point markers stay on their node)
    for name in ("config.yaml", "meta.json", "metrics.jsonl", "eval.json", "index/index.json", "index/items.parquet", "index/seen.parquet"):
        assert name in seen["run_objects"]
    assert not any(o.startswith("workers/") for o in seen["run_objects"])
    # the replacement node ran a worker: it fetched the dataset and the run itself
    assert "s3/rayrec/data/ml-100k" in seen["worker_node_caches"]["train-c"]
    # serving: every replica on the node that never trained, which fetched the index from the bucket
    assert seen["replica_nodes"] == [True]
    assert "ServeReplica:rayrec:Ingress" in seen["replicas"]  # retrieval runs inside the Ingress replica
    assert "s3/rayrec/runs/multinode/index" in seen["serve_node_cache"]
    assert seen["recommend"]["status"] == 200 and len(seen["recommend"]["body"]["items"]) == 10
    assert seen["recommend"]["body"]["model_version"] == "multinode/epoch-0002"
    assert seen["local_runs_folders"] == []
