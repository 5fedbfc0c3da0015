"""``rayrec demo`` prints rayrec's own lines only: stages with wall times, progress bars drawn
from the workers' metrics, the answers; Ray's output stays in the session's log folder.

One real run of the command in a subprocess (stdout and stderr together, as a user sees them),
on the tiny config without the ranker: about a minute on 2 cores, most of it Ray starting and
the 2-worker training the full demo also runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.s3_server import free_port

REPO = Path(__file__).resolve().parents[2]
LINE_BUDGET = 60  # the full demo (retriever + ranker) prints 56-57 lines; this run about 40

# what Ray, its workers and the libraries print when they reach the console
_NOT_RAYREC = [
    re.compile(r"\((raylet|\w+ pid=\d+|[\w:]+ pid=\d+)\)"),  # forwarded worker/actor output
    re.compile(r"\b(WARNING|INFO|ERROR)\b.* -- "),  # Ray's and Serve's log format
    re.compile(r"\w+Warning: "),  # a Python warning
    re.compile(r"\b[WIE]\d{4} \d\d:\d\d:\d\d"),  # glog / torch logging
    re.compile(r"Traceback \(most recent call last\)"),
]


@pytest.fixture(scope="module")
def demo_output(ml100k_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[str]]:
    runs = tmp_path_factory.mktemp("demo-runs")
    ray_tmp = tempfile.mkdtemp(prefix="rd-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != "RAYREC_VERBOSE"}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_tmp)
    command = [sys.executable, "-m", "cluster.cli", "demo", "--no-ranker", "--config", str(REPO / "configs" / "tiny.yaml"),
               "--set", f"data.path={ml100k_dir}", "--set", f"runs_dir={runs}", "--port", str(free_port())]  # fmt: skip
    proc = subprocess.run(command, cwd=runs, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=480)  # fmt: skip
    return proc.returncode, proc.stdout.splitlines()


def test_demo_prints_rayrec_lines_only_within_the_budget(demo_output):
    returncode, lines = demo_output
    assert returncode == 0, "\n".join(lines[-40:])
    foreign = [line for line in lines if any(p.search(line) for p in _NOT_RAYREC)]
    assert foreign == [], "lines from Ray or a library reached the console:\n" + "\n".join(foreign)
    assert len(lines) <= LINE_BUDGET, f"{len(lines)} lines:\n" + "\n".join(lines)


def test_demo_shows_stages_training_progress_logs_and_ends_with_the_answers(demo_output):
    _, lines = demo_output
    stages = [line for line in lines if re.match(r"\[\d/5\] ", line)]
    assert [re.match(r"\[(\d)/5\]", line).group(1) for line in stages] == ["1", "2", "3", "4", "5"]
    assert all(re.search(r": \d+\.\ds", line) for line in stages if "train the retriever" not in line)
    # one finished bar per epoch (configs/tiny.yaml: 2 epochs of 40 steps), drawn from the workers' records
    bars = [line for line in lines if re.match(r"\s+epoch \d/2 \[=+\] 40/40  loss [\d.]+  [\d,]+ ex/s  recall@10", line)]
    assert len(bars) == 2, "\n".join(lines)
    assert any(re.match(r"\s+after training \[=+\] 2/2  test metrics, serving index", line) for line in lines)
    logs = next(line for line in lines if "Ray's logs: " in line)
    folder = Path(re.search(r"Ray's logs: (\S+)", logs).group(1))
    assert (folder / "rayrec-driver.log").is_file()  # the driver's Ray lines went there
    assert any(p.name.startswith("worker-") for p in folder.iterdir())  # and the workers' output
    # the answers come last, the unknown user's popularity fallback with 5 items, then the page's link
    assert lines[-7].startswith("user 999999  [fallback: popularity]")
    assert [line.strip()[:2] for line in lines[-6:-1]] == ["1.", "2.", "3.", "4.", "5."]
    assert re.match(r"look at it: http://127\.0\.0\.1:\d+/ui  \(make demo KEEP_SERVING=1 keeps it up\)$", lines[-1])
