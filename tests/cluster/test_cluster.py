"""End to end through the CLI: a real local Ray head, real Ray Jobs, stopped without `ray stop`.

One head for the module (starting one costs ~20 s). Ports are this suite's own: GCS 6391,
dashboard 8271, metrics 8281, Serve 8320; everything binds to loopback. `cluster start`/`stop`
run as real `python -m cluster.cli` processes; the job commands go through the same ``main``
in-process, which spares a Python + Ray import per call on a busy machine.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RAYREC = [sys.executable, "-m", "cluster.cli"]
GCS_PORT, DASHBOARD_PORT, METRICS_PORT, SERVE_PORT = 6391, 8271, 8281, 8320
ADDRESS = f"http://127.0.0.1:{DASHBOARD_PORT}"


def rayrec_process(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYREC, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def rayrec(*args: str) -> subprocess.CompletedProcess:
    """``rayrec ARGS`` through ``cluster.cli.main`` in this process, output captured."""
    from cluster.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        returncode = main(list(args))
    return subprocess.CompletedProcess(list(args), returncode, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def head():
    saved_env = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_RUNTIME_ENV_IGNORE_GITIGNORE")}
    started = rayrec_process(  # generous timeout: a busy shared machine slows Ray start-up a lot
        "cluster", "start", "--port", str(GCS_PORT), "--dashboard-port", str(DASHBOARD_PORT),
        "--metrics-export-port", str(METRICS_PORT), "--num-cpus", "4", "--timeout", "300",
    )
    assert started.returncode == 0, started.stderr
    state = json.loads(Path(f"/tmp/rayrec/head-{GCS_PORT}/rayrec-head.json").read_text())
    yield {"start_output": started.stdout, "pid": state["pid"]}
    rayrec_process("cluster", "stop", "--port", str(GCS_PORT))  # no-op if the last test stopped it
    for name, value in saved_env.items():  # the in-process client switched token mode on
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_start_prints_addresses_and_status_reports_resources(head):
    assert f"dashboard:            {ADDRESS}" in head["start_output"]
    assert f"job submission:       {ADDRESS}" in head["start_output"]
    assert f"127.0.0.1:{METRICS_PORT}/metrics" in head["start_output"]
    assert "resources:            CPU=4, GPU=auto-detected" in head["start_output"]
    status = rayrec("cluster", "status", "--port", str(GCS_PORT))
    assert status.returncode == 0, status.stderr
    assert "0.0/4.0 CPU" in status.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as response:
        assert b"# TYPE" in response.read()


def test_job_api_requires_a_token_and_the_cli_sends_it(head):
    # Without a token the job API refuses; every rayrec command in this file gets through.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ADDRESS}/api/jobs/", timeout=10)
    assert refused.value.code == 401
    listed = rayrec("jobs", "list", "--address", ADDRESS)
    assert listed.returncode == 0, listed.stderr


def test_submitted_job_runs_in_the_shipped_repo_and_follow_succeeds(head, tmp_path: Path):
    marker = tmp_path / "marker.txt"
    script = (
        "import pathlib, sys; "
        "assert pathlib.Path('training/data').is_dir(), 'training/data package not shipped'; "
        "assert not pathlib.Path('.venv').exists() and not pathlib.Path('.git').exists(); "
        f"pathlib.Path({str(marker)!r}).write_text('ran in ' + str(pathlib.Path.cwd()))"
    )
    result = rayrec("submit", "command", "--address", ADDRESS, "--follow", "--", "python", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stderr
    assert marker.read_text().startswith("ran in ")
    assert marker.read_text() != f"ran in {REPO}"  # an uploaded copy, not the checkout


def test_failing_job_makes_follow_exit_nonzero_with_the_error_in_its_logs(head):
    name = f"rayrec-cmd-fails-{int(time.time())}"
    script = "import sys; print('boom: the entrypoint failed'); sys.exit(3)"
    result = rayrec("submit", "command", "--address", ADDRESS, "--name", name, "--follow", "--", "python", "-c", script)
    assert result.returncode != 0
    assert "boom: the entrypoint failed" in result.stdout
    assert f"job {name} FAILED" in result.stderr

    logs = rayrec("jobs", "logs", name, "--address", ADDRESS)
    assert "boom: the entrypoint failed" in logs.stdout
    follow_again = rayrec("jobs", "logs", name, "-f", "--address", ADDRESS)
    assert follow_again.returncode != 0
    status = json.loads(rayrec("jobs", "status", name, "--address", ADDRESS).stdout)
    assert status["status"] == "FAILED" and status["driver_exit_code"] == 3
    assert status["metadata"]["rayrec.kind"] == "command"
    assert "rayrec.git_commit" in status["metadata"]


def test_jobs_list_status_and_stop(head):
    name = f"rayrec-cmd-sleeps-{int(time.time())}"
    submitted = rayrec("submit", "command", "--address", ADDRESS, "--name", name, "--", "python", "-c", "import time; time.sleep(300)")
    assert submitted.returncode == 0, submitted.stderr
    listed = rayrec("jobs", "list", "--address", ADDRESS)
    assert name in listed.stdout
    assert rayrec("jobs", "stop", name, "--address", ADDRESS).returncode == 0
    deadline = time.monotonic() + 60
    status = {}
    while time.monotonic() < deadline:
        status = json.loads(rayrec("jobs", "status", name, "--address", ADDRESS).stdout)
        if status["status"] == "STOPPED":
            break
        time.sleep(1)
    assert status["status"] == "STOPPED"
    unknown = rayrec("jobs", "status", "no-such-job", "--address", ADDRESS)
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr


def test_broken_config_fails_before_submission_naming_the_key(head, tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: two_tower\ntrain:\n  epochz: 2\n")
    before = rayrec("jobs", "list", "--address", ADDRESS).stdout.count("rayrec-train-broken")
    result = rayrec("submit", "train", "--address", ADDRESS, "--config", str(broken))
    assert result.returncode == 2
    assert "epochz" in result.stderr
    assert rayrec("jobs", "list", "--address", ADDRESS).stdout.count("rayrec-train-broken") == before


def test_the_cluster_says_its_head_is_on_this_machine(head):
    from cluster.submit import head_is_local

    assert head_is_local(ADDRESS) is True
    assert head_is_local("http://127.0.0.1:1") is None  # nobody to ask: the caller decides


def test_submit_train_runs_the_tiny_config_to_a_finished_run(head, ml100k_dir: Path, tmp_path: Path):
    runs = tmp_path / "runs"
    result = rayrec(
        "submit", "train", "--address", ADDRESS, "--config", "configs/tiny.yaml",
        "--set", f"data.path={ml100k_dir}", "--run-id", "tiny-on-cluster", "--runs-dir", str(runs), "--follow",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = runs / "tiny-on-cluster"
    index = json.loads((run / "index" / "index.json").read_text())
    assert index["version"].startswith("tiny-on-cluster/epoch-")
    assert (run / "eval.json").exists() and (run / "metrics.jsonl").read_text().strip()
    submission = result.stdout.split("submitted ", 1)[1].split()[0]
    status = json.loads(rayrec("jobs", "status", submission, "--address", ADDRESS).stdout)
    assert status["metadata"]["rayrec.config"] == "configs/tiny.yaml"
    assert len(status["metadata"]["rayrec.config_hash"]) == 12


def test_submit_serve_deploys_a_run_that_answers_on_loopback(head, tmp_path: Path):
    from tests.serving.toy_run import write_toy_run

    toy = write_toy_run(tmp_path / "project")
    result = rayrec(
        "submit", "serve", "--address", ADDRESS, "--run", str(toy.run_dir),
        "--host", "127.0.0.1", "--port", str(SERVE_PORT), "--follow",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    user = int(toy.user_ids[0])
    request = urllib.request.Request(
        f"http://127.0.0.1:{SERVE_PORT}/recommend",
        data=json.dumps({"user_id": user, "k": 5}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert [item["item_id"] for item in body["items"]] == toy.expected_top(user, 5)


def test_stop_stops_only_this_head(head):
    # A bystander whose command line matches what `ray stop` kills (it matches "default_worker.py"
    # anywhere in a command line): stopping our head must leave it alone.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "ray/_private/workers/default_worker.py"],
        start_new_session=True,
    )
    try:
        stopped = rayrec_process("cluster", "stop", "--port", str(GCS_PORT))
        assert stopped.returncode == 0, stopped.stderr
        assert bystander.poll() is None, "cluster stop killed a process that was not ours"
        assert not _group_has_live_members(head["pid"])
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{ADDRESS}/api/version", timeout=5)
        assert rayrec("cluster", "status", "--port", str(GCS_PORT)).returncode == 1
    finally:
        os.kill(bystander.pid, signal.SIGKILL)
        bystander.wait()


def _group_has_live_members(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid and " Z " not in (entry / "stat").read_text().split(")", 1)[1][:4]:
                return True
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            continue
    return False
