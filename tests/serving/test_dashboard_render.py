"""The dashboard renderer's PromQL subset: every query of the shipped dashboard evaluates, and
rate, aggregation, ratios and histogram quantiles give the numbers Prometheus would (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.dashboard_render import Query, Scrapes, parse_metrics, render

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "rayrec-serving-dashboard.json"


def scrape(n: int) -> str:
    """The n-th scrape of a counter growing 10/s on one route (5 s apart) and a histogram."""
    return f"""# TYPE ray_rayrec_http_requests_total counter
ray_rayrec_http_requests_total{{application="rayrec",route="/recommend",status="200"}} {50 * n}
ray_rayrec_http_requests_total{{application="rayrec",route="/recommend",status="422"}} {5 * n}
# TYPE ray_rayrec_http_request_latency_ms histogram
ray_rayrec_http_request_latency_ms_bucket{{application="rayrec",route="/recommend",le="10.0"}} {10 * n}
ray_rayrec_http_request_latency_ms_bucket{{application="rayrec",route="/recommend",le="20.0"}} {20 * n}
ray_rayrec_http_request_latency_ms_bucket{{application="rayrec",route="/recommend",le="+Inf"}} {20 * n}
ray_rayrec_http_request_latency_ms_count{{application="rayrec",route="/recommend"}} {20 * n}
ray_rayrec_http_request_latency_ms_sum{{application="rayrec",route="/recommend"}} {200 * n}
"""


@pytest.fixture
def scrapes() -> Scrapes:
    return Scrapes(np.arange(6) * 5.0, [parse_metrics(scrape(n)) for n in range(6)])


def test_rate_sum_by_and_ratio(scrapes: Scrapes) -> None:
    by_status = Query('sum by (status) (rate(ray_rayrec_http_requests_total{application=~"$application"}[$__rate_interval]))',
                      scrapes).evaluate()  # fmt: skip
    assert by_status[(("status", "200"),)][-1] == pytest.approx(10.0)
    assert np.isnan(by_status[(("status", "200"),)][0])  # no rate before enough scrapes
    share = Query('sum(rate(ray_rayrec_http_requests_total{status="422"}[1m])) / '
                  "sum(rate(ray_rayrec_http_requests_total[1m]))", scrapes).evaluate()  # fmt: skip
    assert share[()][-1] == pytest.approx(1 / 11)


def test_histogram_quantile_interpolates_like_prometheus(scrapes: Scrapes) -> None:
    p50 = Query("histogram_quantile(0.5, sum by (le, route) (rate(ray_rayrec_http_request_latency_ms_bucket[1m])))",
                scrapes).evaluate()  # fmt: skip
    assert p50[(("route", "/recommend"),)][-1] == pytest.approx(10.0)  # rank 2/4: the top of the first bucket
    p75 = Query("histogram_quantile(0.75, sum by (le) (rate(ray_rayrec_http_request_latency_ms_bucket[1m])))", scrapes).evaluate()
    assert p75[()][-1] == pytest.approx(15.0)


def test_every_dashboard_query_evaluates_and_renders(scrapes: Scrapes, tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            Query(target["expr"], scrapes).evaluate()  # raises on anything outside the subset
    render(dashboard, scrapes, tmp_path / "d.png", caption="test")
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_query_outside_the_subset_is_refused(scrapes: Scrapes) -> None:
    with pytest.raises(ValueError):
        Query("increase(ray_rayrec_http_requests_total[1m]) * 2", scrapes).evaluate()
