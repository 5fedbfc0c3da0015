"""The README's pictures: ``python -m serving.screenshots --out docs/img/`` (or ``make screenshots``).

Serves a run on a local Ray of its own (the newest trained run under ``runs/``, else the toy run
the serving tests use), sends a minute or so of traffic (known and unknown users, a few bad
requests, feedback), then writes:

    ui.png         /ui in headless Chromium for one user (``serving.browser``)
    dashboard.png  the Grafana dashboard's panels drawn from the app's own /metrics scrapes
                   (``serving.dashboard_render``: a rendering of its queries, not Grafana)

Why a local Ray of its own: the metrics endpoint and Serve's port must be this command's, not
those of a cluster someone else is using; its metrics report every 2 s instead of Ray's 10 so
a minute of traffic gives enough points.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "k8s" / "monitoring" / "rayrec-serving-dashboard.json"
DEFAULT_PORT = 8391
METRICS_PORT = 8392


def newest_trained_run(runs_dir: Path) -> Path | None:
    """The newest run under ``runs_dir`` with a serving index (``index/index.json``)."""
    runs = [p.parent.parent for p in runs_dir.glob("*/index/index.json")]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def toy_run_dir() -> Path:
    """The serving tests' toy run, written to a temporary folder (only in a checkout: it lives
    in tests/, since it exists for them)."""
    from tests.serving.toy_run import write_toy_run

    return write_toy_run(Path(tempfile.mkdtemp(prefix="rayrec-toy-"))).run_dir


def send_traffic(client: httpx.Client, users: list[int], seconds: float, scrape) -> None:
    """Recommend for random users (some unknown, a few malformed), click some answers, and call
    ``scrape()`` every few seconds meanwhile."""
    rng = random.Random(0)
    end, next_scrape = time.monotonic() + seconds, 0.0
    while time.monotonic() < end:
        if time.monotonic() >= next_scrape:
            scrape()
            next_scrape = time.monotonic() + 3
        user = rng.choice(users) if rng.random() > 0.1 else 987_654_321 + rng.randrange(100)
        if rng.random() < 0.03:
            client.post("/recommend", json={"user_id": str(user)})  # a 422, for the errors panel
            continue
        body = client.post("/recommend", json={"user_id": user, "k": 10}).json()
        if body.get("items") and rng.random() < 0.2:
            item = body["items"][0]["item_id"]
            event = {"event_id": f"shot-{body['request_id']}", "user_id": user, "item_id": item, "event": "click",
                     "timestamp": int(time.time()), "request_id": body["request_id"]}  # fmt: skip
            client.post("/feedback", json={"events": [event]})
        time.sleep(0.05)
    scrape()


def shrink(path: Path, colours: int = 64) -> None:
    """Re-save a PNG with a small palette: the README's pictures are flat colours and text, and
    the repository keeps every version of them (about a third of the size)."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    parser.add_argument("--run", type=Path, default=None, help="run folder (default: newest under runs/, else the toy run)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--seconds", type=float, default=75.0, help="traffic before the dashboard is drawn")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.run or newest_trained_run(REPO / "runs") or toy_run_dir()

    os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
    import ray

    from serving.app import ServingSettings, serve_app
    from serving.browser import chromium_page, show_user
    from serving.dashboard_render import Scrapes, parse_metrics, render
    from serving.run_index import index_dir
    from serving.retriever import RetrievalIndex
    from serving.serve_env import apply_serve_env
    from serving.ui import example_users
    from training.log_setup import init_ray

    apply_serve_env(stats_port=METRICS_PORT + 1, metrics_port=METRICS_PORT + 2)
    init_ray(address="local", num_cpus=4, _metrics_export_port=METRICS_PORT,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})  # fmt: skip
    try:
        feedback = tempfile.mkdtemp(prefix="rayrec-shots-feedback-")
        url = serve_app(run, port=args.port, settings=ServingSettings(feedback_dir=feedback))
        index = RetrievalIndex(index_dir(run))
        users = index.seen.users.tolist()
        times: list[float] = []
        samples: list[dict] = []

        def scrape() -> None:
            text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).text
            times.append(time.time())
            samples.append(parse_metrics(text))

        with httpx.Client(base_url=url, timeout=60) as client:
            send_traffic(client, users, args.seconds, scrape)
        import numpy as np

        render(json.loads(DASHBOARD.read_text()), Scrapes(np.array(times), samples), args.out / "dashboard.png",
               caption=f"its queries drawn from {len(samples)} scrapes of the app's /metrics (not Grafana)")  # fmt: skip
        with chromium_page() as page:
            show_user(page, url, example_users(index, 1)[0])
            page.click("#ranked tr:first-child button.click")  # the ack shows in the picture
            page.wait_for_function("document.getElementById('ack').textContent.includes('acknowledged')")
            page.screenshot(path=str(args.out / "ui.png"), full_page=False)
        for name in ("ui.png", "dashboard.png"):
            shrink(args.out / name)
        print(f"wrote {args.out / 'ui.png'} and {args.out / 'dashboard.png'} (run {run})")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
