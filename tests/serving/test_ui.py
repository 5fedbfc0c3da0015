"""The page at /ui in a real headless Chromium, and the two reads behind it, over real HTTP.

Serve runs the retrieval-only app on the toy run (port 8390, on the session's Ray); the browser
is Debian's ``chromium`` driven by Playwright (``serving.browser`` says why). The page must show
what the JSON API answers: the test reads the same user through the API and compares.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from ray import serve

from serving.app import APP_NAME
from serving.browser import VIEWPORT, chromium_page, find_chromium, show_user
from serving.feedback_log import read_feedback
from tests.serving.conftest import served_toy_app
from tests.serving.toy_run import UNKNOWN_USER, ToyRun

PORT = 8390


@pytest.fixture(scope="module")
def base_url(ray_session, toy_run: ToyRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with served_toy_app(toy_run, PORT, tmp_path_factory) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def seen_in_file_order(toy_run: ToyRun, user_id: int) -> list[int]:
    """The user's rows of seen.parquet in file order (training writes them oldest first)."""
    table = pq.read_table(toy_run.run_dir / "index" / "seen.parquet")
    return table.filter(pc.field("user_id") == user_id).column("item_id").to_pylist()


def busiest_user(toy_run: ToyRun) -> int:
    return max(toy_run.seen, key=lambda u: len(toy_run.seen[u]))


# ---------------------------------------------------------------- the JSON reads behind the page
def test_history_is_the_last_seen_items_newest_first(client: httpx.Client, toy_run: ToyRun) -> None:
    user = busiest_user(toy_run)
    response = client.get(f"/users/{user}/history", params={"limit": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    want = seen_in_file_order(toy_run, user)[::-1][:5]
    assert [i["item_id"] for i in body["items"]] == want
    assert [i["title"] for i in body["items"]] == [toy_run.titles[i] for i in want]
    assert body["total"] == len(toy_run.seen[user])
    assert len(client.get(f"/users/{user}/history").json()["items"]) == min(20, len(toy_run.seen[user]))


def test_history_of_a_known_user_without_items_is_empty(client: httpx.Client, toy_run: ToyRun) -> None:
    body = client.get(f"/users/{int(toy_run.user_ids[0])}/history").json()
    assert body["items"] == [] and body["total"] == 0


def test_history_unknown_user_is_404_and_bad_input_422(client: httpx.Client) -> None:
    unknown = client.get(f"/users/{UNKNOWN_USER}/history")
    assert unknown.status_code == 404 and "unknown" in unknown.json()["detail"]
    for path in ("/users/abc/history", "/users/5/history?limit=0", "/users/5/history?limit=201",
                 f"/users/{2**63}/history"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["detail"]


def test_candidates_are_retrievals_answer(client: httpx.Client, toy_run: ToyRun) -> None:
    user = busiest_user(toy_run)
    body = client.get(f"/users/{user}/candidates").json()
    assert [i["item_id"] for i in body["items"]] == toy_run.expected_top(user, 50)
    assert body["fallback"] is None and body["index"] == "exact"
    assert client.get(f"/users/{UNKNOWN_USER}/candidates").json()["fallback"] == "popularity"


def test_ui_is_html_and_not_in_the_openapi_schema(client: httpx.Client, toy_run: ToyRun) -> None:
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/*EXAMPLE_USERS*/" not in page.text  # this run's example users were filled in
    paths = client.get("/openapi.json").json()["paths"]
    assert "/ui" not in paths and "/users/{user_id}/history" in paths


# ---------------------------------------------------------------- the page in Chromium
@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_page_shows_what_the_api_answers_and_sends_feedback(client: httpx.Client, base_url: str, toy_run: ToyRun) -> None:
    from PIL import Image

    user = busiest_user(toy_run)
    history = client.get(f"/users/{user}/history", params={"limit": 20}).json()
    candidates = client.get(f"/users/{user}/candidates").json()
    ranked = client.post("/recommend", json={"user_id": user, "k": 10}).json()

    with chromium_page() as page:
        show_user(page, base_url, user)

        def item_ids(selector: str) -> list[int]:
            return [int(e.get_attribute("data-item-id")) for e in page.query_selector_all(selector)]

        assert item_ids("#history li") == [i["item_id"] for i in history["items"]]
        assert page.locator("#history li").all_inner_texts() == [i["title"] or f"item {i['item_id']}" for i in history["items"]]
        assert item_ids("#candidates li") == [i["item_id"] for i in candidates["items"]]
        assert item_ids("#ranked tr") == [i["item_id"] for i in ranked["items"]]
        assert page.locator("#ranked td.title").all_inner_texts() == [i["title"] or f"item {i['item_id']}" for i in ranked["items"]]
        shown_scores = [float(s) for s in page.locator("#ranked td.score").all_inner_texts()]
        assert shown_scores == pytest.approx([i["score"] for i in ranked["items"]], abs=1e-4)
        stages = page.locator("#timings .pill").evaluate_all("els => els.map(e => e.dataset.stage)")
        assert set(stages) == set(ranked["timings_ms"])  # per-stage timings, as /recommend reports them
        assert page.inner_text("#fm") == "no FM cache read"  # retrieval-only: fm_from_cache is null

        page.click("#ranked tr:first-child button.click")
        page.wait_for_function("document.getElementById('ack').textContent.includes('acknowledged')")
        first_title = ranked["items"][0]["title"] or f"item {ranked['items'][0]['item_id']}"
        assert page.inner_text("#ack") == f'/feedback: click on "{first_title}" acknowledged (1 event durable)'

        png = page.screenshot()
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (VIEWPORT["width"], VIEWPORT["height"])
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50, "the screenshot is (nearly) blank"

        show_user(page, base_url, UNKNOWN_USER)  # unknown: the 404's message, then popularity
        assert "unknown" in page.inner_text("#history")
        assert "fallback: popularity" in page.inner_text("#timings")
    # the click button sent what counterfactual evaluation needs (checked outside the page: its
    # sync Playwright loop forbids blocking Serve calls)
    sink = serve.get_deployment_handle("FeedbackSink", APP_NAME)
    sink.compact.remote().result()
    (logged,) = [r for r in read_feedback(sink.info.remote().result()["log_dir"]).to_pylist() if r["event"] == "click"]
    assert (logged["item_id"], logged["position"], logged["candidates"], logged["model_version"]) == (
        ranked["items"][0]["item_id"], 0, ranked["candidates"], ranked["model_version"])  # fmt: skip
    assert logged["ranker_version"] is None  # retrieval-only: the page leaves null versions out
