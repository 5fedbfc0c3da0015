"""Draw the Grafana dashboard (``k8s/monitoring/*.json``) from scrapes of the app's real
Prometheus endpoint, without Grafana or Prometheus: for the README's picture of the dashboard.

Neither Grafana nor Prometheus installs from this project's package registries, so this reads
the dashboard's own panels and evaluates each target's query over a series of ``/metrics``
scrapes, with a small evaluator for the subset of PromQL the dashboard uses:

    sum|max|min|avg [by (labels)] (expr)     rate(metric{matchers}[range])
    histogram_quantile(q, expr)              a / b (series matched on equal labels)
    metric{label="v", label=~"regex"}        ($application is ".*", $__rate_interval 3 scrapes)

Anything else raises ``ValueError`` naming the query, so a dashboard edit that this cannot draw
fails loudly instead of drawing something else. A rate here is over the last few scrapes (the
scrape interval is the caller's), not Prometheus's extrapolating ``rate``; the picture is a
rendering of the dashboard's queries, not Grafana's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Vector = dict[Labels, np.ndarray]
"""Series by label set, each [T] over the scrapes (NaN: absent then)."""

RATE_SCRAPES = 3
_TOKEN = re.compile(r'\s*(?:(?P<num>\d+\.?\d*)|(?P<id>[A-Za-z_:][\w:]*)|(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>=~|!=|[(){}\[\],=/]))')


@dataclass(frozen=True)
class Scrapes:
    """``/metrics`` read T times: ``times`` [T] seconds and one {(name, labels): value} per scrape."""

    times: np.ndarray
    samples: list[dict[tuple[str, Labels], float]]


def parse_metrics(text: str) -> dict[tuple[str, Labels], float]:
    """One scrape: every sample (``_bucket``/``_sum``/``_count``/``_total`` names as exported)."""
    out: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


class Query:
    """One PromQL expression of the dashboard's subset, evaluated over ``Scrapes``."""

    def __init__(self, expr: str, scrapes: Scrapes) -> None:
        self.expr, self.scrapes = expr, scrapes
        text = expr.replace("$__rate_interval", "1m").replace('"$application"', '".*"')
        self.tokens = [next(g for g in m.groupdict().values() if g is not None) for m in _TOKEN.finditer(text)]
        if "".join(self.tokens) != re.sub(r"\s+", "", text):
            raise ValueError(f"cannot tokenise {expr!r}")
        self.pos = 0

    def evaluate(self) -> Vector:
        vector = self._binary()
        if self.pos != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.pos]!r} in {self.expr!r}")
        return vector

    # ------------------------------------------------------------------ parsing
    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, want: str | None = None) -> str:
        token = self._peek()
        if token is None or (want is not None and token != want):
            raise ValueError(f"expected {want!r}, got {token!r} in {self.expr!r}")
        self.pos += 1
        return token

    def _binary(self) -> Vector:
        left = self._unary()
        while self._peek() == "/":
            self._take("/")
            right = self._unary()
            left = {labels: left[labels] / right[labels] for labels in left if labels in right}
        return left

    def _unary(self) -> Vector:
        name = self._take()
        if name in ("sum", "max", "min", "avg"):
            by: list[str] | None = None
            if self._peek() == "by":
                self._take("by")
                by = self._labels()
            self._take("(")
            inner = self._binary()
            self._take(")")
            return _aggregate(name, inner, by or [])
        if name == "rate":
            self._take("(")
            series = self._selector(self._take())
            self._take(")")
            return {labels: _rate(values, self.scrapes.times) for labels, values in series.items()}
        if name == "histogram_quantile":
            self._take("(")
            q = float(self._take())
            self._take(",")
            buckets = self._binary()
            self._take(")")
            return _histogram_quantile(q, buckets)
        return self._selector(name)

    def _labels(self) -> list[str]:
        self._take("(")
        names = [self._take()]
        while self._peek() == ",":
            self._take(",")
            names.append(self._take())
        self._take(")")
        return names

    def _selector(self, metric: str) -> Vector:
        matchers: list[tuple[str, str, str]] = []
        if self._peek() == "{":
            self._take("{")
            while self._peek() != "}":
                label, op, value = self._take(), self._take(), self._take()[1:-1]
                matchers.append((label, op, value))
                if self._peek() == ",":
                    self._take(",")
            self._take("}")
        if self._peek() == "[":  # the range: rate's window is RATE_SCRAPES scrapes whatever it says
            while self._take() != "]":
                pass
        keys = {key for sample in self.scrapes.samples for key in sample if key[0] == metric}
        keys = {key for key in keys if all(_matches(dict(key[1]).get(l, ""), op, v) for l, op, v in matchers)}
        return {
            labels: _hold(np.array([s.get((metric, labels), np.nan) for s in self.scrapes.samples]))
            for _, labels in sorted(keys)
        }


def _matches(actual: str, op: str, value: str) -> bool:
    if op == "=":
        return actual == value
    if op == "!=":
        return actual != value
    if op == "=~":
        return re.fullmatch(value, actual) is not None
    raise ValueError(f"matcher {op!r}")


def _hold(values: np.ndarray) -> np.ndarray:
    """A sample missing from a scrape keeps the last value, as Prometheus's lookback does (Ray's
    agent leaves some series out of some exports)."""
    out = values.copy()
    for t in range(1, len(out)):
        if math.isnan(out[t]):
            out[t] = out[t - 1]
    return out


def _rate(values: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per-second increase over the last ``RATE_SCRAPES`` scrapes ([T], NaN until there are enough)."""
    out = np.full(len(values), np.nan)
    for t in range(RATE_SCRAPES - 1, len(values)):
        a, b = values[t - RATE_SCRAPES + 1], values[t]
        if not (math.isnan(a) or math.isnan(b) or b < a):  # a reset: no rate for that window
            out[t] = (b - a) / (times[t] - times[t - RATE_SCRAPES + 1])
    return out


def _aggregate(op: str, vector: Vector, by: list[str]) -> Vector:
    groups: dict[Labels, list[np.ndarray]] = {}
    for labels, values in vector.items():
        key = tuple((k, v) for k, v in labels if k in by)
        groups.setdefault(key, []).append(values)
    reduce = {"sum": np.nansum, "max": np.nanmax, "min": np.nanmin, "avg": np.nanmean}[op]
    out: Vector = {}
    for key, rows in groups.items():
        stacked = np.vstack(rows)  # [S, T]
        present = ~np.isnan(stacked).all(axis=0)  # [T]
        result = np.full(stacked.shape[1], np.nan)
        if present.any():
            result[present] = reduce(stacked[:, present], axis=0)
        out[key] = result
    return out


def _histogram_quantile(q: float, buckets: Vector) -> Vector:
    """Prometheus's estimate: linear interpolation inside the bucket holding the q-th rank."""
    groups: dict[Labels, list[tuple[float, np.ndarray]]] = {}
    for labels, values in buckets.items():
        le = dict(labels)["le"]
        groups.setdefault(tuple((k, v) for k, v in labels if k != "le"), []).append((float(le), values))
    out: Vector = {}
    for key, rows in groups.items():
        rows.sort(key=lambda row: row[0])
        bounds = [b for b, _ in rows]
        counts = np.vstack([v for _, v in rows])  # [B, T] cumulative
        result = np.full(counts.shape[1], np.nan)
        for t in range(counts.shape[1]):
            column = counts[:, t]
            if np.isnan(column).any() or column[-1] <= 0:
                continue
            rank = q * column[-1]
            b = int(np.searchsorted(column, rank))
            if bounds[b] == math.inf:
                result[t] = bounds[b - 1] if b > 0 else math.nan
                continue
            lower, below = (bounds[b - 1], column[b - 1]) if b > 0 else (0.0, 0.0)
            inside = column[b] - below
            result[t] = lower + (bounds[b] - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        out[key] = result
    return out


def legend(fmt: str | None, labels: Labels) -> str:
    """A target's ``legendFormat`` with ``{{label}}`` filled in (else the labels themselves)."""
    values = dict(labels)
    if fmt:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), fmt).strip()
    return ", ".join(f"{k}={v}" for k, v in labels) or "value"


def render(dashboard: dict, scrapes: Scrapes, out: Path, caption: str) -> None:
    """Draw every panel where its ``gridPos`` puts it (24 columns), rows as section titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(15, height * 0.26))
    fig.suptitle(f"{dashboard.get('title', 'dashboard')}: {caption}", fontsize=10, y=0.997)
    minutes = (scrapes.times - scrapes.times[0]) / 60
    for panel in panels:
        g = panel["gridPos"]
        left, top = g["x"] / 24, 1 - g["y"] / height
        if panel["type"] == "row":
            fig.text(left + 0.005, top - 0.4 / height, panel["title"], fontsize=10, weight="bold", va="top")
            continue
        ax = fig.add_axes((left + 0.035, top - (g["h"] - 1.6) / height, g["w"] / 24 - 0.05, (g["h"] - 2.6) / height))
        ax.set_title(panel["title"], fontsize=8.5, loc="left")
        ax.tick_params(labelsize=7)
        drawn = 0
        for target in panel.get("targets", []):
            for labels, values in Query(target["expr"], scrapes).evaluate().items():
                if not np.isnan(values).all():
                    ax.plot(minutes, values, linewidth=1.2, label=legend(target.get("legendFormat"), labels)[:40])
                    drawn += 1
        if drawn:
            ax.legend(fontsize=6, loc="upper left", frameon=False, ncol=2)
            unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
            ax.set_xlabel(f"minutes{f'  ({unit})' if unit else ''}", fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.grid(alpha=0.3)
    fig.savefig(out, dpi=72)
    plt.close(fig)
