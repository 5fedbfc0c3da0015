"""k8s/monitoring/rayrec-serving-dashboard.json queries only metrics that exist.

rayrec's own metrics are read out of serving/*.py (every ``Counter``/``Gauge``/``Histogram``
a deployment creates) and named the way Ray's Prometheus exporter names them: ``ray_`` in front,
``_total`` after a counter, ``_bucket``/``_sum``/``_count`` after a histogram (checked against a
live export in tests/serving/test_ingress.py). Ray's own (``ray_serve_*``, ``ray_node_*``) are
looked up in the installed Ray's source, where it defines them.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "k8s" / "monitoring" / "rayrec-serving-dashboard.json"
_SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
# labels Ray Serve adds to a metric created in a replica (ray/serve/metrics.py), and "le" of histograms
_SERVE_LABELS = {"deployment", "replica", "application", "route", "le"}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _expand(name: ast.JoinedStr, parents: dict[ast.AST, ast.AST]) -> list[str]:
    """``f"rayrec_fm_cache_{name}" for name, desc in {...}.items()`` → one name per key."""
    node = name
    while node in parents and not isinstance(node, (ast.DictComp, ast.ListComp, ast.SetComp, ast.GeneratorExp)):
        node = parents[node]
    source = node.generators[0].iter if isinstance(node, (ast.DictComp, ast.ListComp, ast.SetComp, ast.GeneratorExp)) else None
    if isinstance(source, ast.Call) and isinstance(source.func, ast.Attribute):
        source = source.func.value
    keys = source.keys if isinstance(source, ast.Dict) else getattr(source, "elts", None)
    assert keys, f"cannot resolve the metric name {ast.unparse(name)}"
    prefix = "".join(v.value for v in name.values if isinstance(v, ast.Constant))
    return [prefix + k.value for k in keys]


def rayrec_metrics() -> dict[str, tuple[str, set[str]]]:
    """``{exported name: (kind, label names)}`` for every metric serving/*.py creates."""
    exported: dict[str, tuple[str, set[str]]] = {}
    for path in sorted((REPO / "serving").glob("*.py")):
        tree = ast.parse(path.read_text())
        parents = _parents(tree)
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in _SUFFIXES):
                continue
            if not call.args:
                continue
            first = call.args[0]
            names = [first.value] if isinstance(first, ast.Constant) else _expand(first, parents)
            tags = next((kw.value for kw in call.keywords if kw.arg == "tag_keys"), None)
            labels = {e.value for e in tags.elts} if tags is not None else set()
            for name in names:
                for suffix in _SUFFIXES[call.func.id]:
                    exported[f"ray_{name}{suffix}"] = (call.func.id, labels | _SERVE_LABELS)
    return exported


def ray_metric_patterns() -> list[re.Pattern[str]]:
    """Names the installed Ray defines for Serve and the node (f-string parts become ``\\w+``)."""
    import ray

    root = Path(ray.__file__).parent
    patterns = set()
    for path in [*root.glob("serve/_private/*.py"), *root.glob("dashboard/modules/reporter/*.py")]:
        for literal in re.findall(r'f?"((?:serve|node)_[a-z_{}]+)"', path.read_text()):
            patterns.add("ray_" + re.sub(r"\{\w+\}", r"\\w+", literal) + r"(_total|_bucket|_sum|_count)?")
    return [re.compile(p) for p in patterns]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


def _metrics_in(query: str) -> set[str]:
    return set(re.findall(r"\b(ray_[A-Za-z0-9_]+)\b", query))


def test_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "rayrec-serving"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert _metrics_in(expr), f"{panel['title']}: {expr} names no metric"


def test_every_query_names_a_metric_the_app_or_ray_exports():
    ours, ray_patterns = rayrec_metrics(), ray_metric_patterns()
    unknown = []
    for query in dashboard_queries():
        for metric in _metrics_in(query):
            if metric.startswith("ray_rayrec_"):
                known = metric in ours
            else:
                known = any(p.fullmatch(metric) for p in ray_patterns)
            if not known:
                unknown.append(f"{metric} in {query}")
    assert unknown == [], "metrics nobody exports:\n" + "\n".join(unknown)


def test_rayrec_queries_use_labels_the_metrics_carry():
    ours = rayrec_metrics()
    for query in dashboard_queries():
        labels = set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)\s*\"", query))  # label matchers
        labels |= {lab.strip() for group in re.findall(r"by \(([^)]*)\)", query) for lab in group.split(",")}
        for metric in _metrics_in(query):
            if metric in ours:
                assert labels <= ours[metric][1], f"{query}: {sorted(labels - ours[metric][1])} not on {metric}"


def _families() -> list[str]:
    """One name per rayrec metric: ``ray_rayrec_fallbacks`` for ``ray_rayrec_fallbacks_total``."""
    return sorted({re.sub(r"_(total|bucket|sum|count)$", "", name) if kind != "Gauge" else name
                   for name, (kind, _) in rayrec_metrics().items()})  # fmt: skip


@pytest.mark.parametrize("metric", _families())
def test_every_rayrec_metric_has_a_panel(metric):
    assert any(metric in query for query in dashboard_queries()), f"{metric} is on no panel of {DASHBOARD.name}"
