"""``rayrec runs list`` and ``rayrec runs compare``: runs side by side, read from their folders.

Only what every job writes is read (``training.runs``): ``config.yaml`` (the resolved config),
``meta.json`` (kind, commit, world size, created), ``metrics.jsonl`` (the epoch reports) and
``eval.json`` (test metrics), from a local folder or object storage alike.

Example::

    rayrec runs list
    rayrec runs compare ml100k-20261206-225114 ml100k-20261207-101500
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from training.runs import RunDir

# the test metrics a run's one-line summary shows, by the key's ending (first found first)
_HEADLINE = ("recall@10", "/auc", "ndcg@10")


@dataclass
class RunRecord:
    """What the folder of one run says about it.

    Args:
        run_id: the folder's name.
        location: where it lives (a path or a URI).
        meta: ``meta.json`` (empty when unreadable).
        config: the resolved config, flattened to dotted keys (``train.lr``).
        epochs: the epoch reports in ``metrics.jsonl``, in order.
        test: ``eval.json`` (empty until the run finished).
    """

    run_id: str
    location: str
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)

    @property
    def planned_epochs(self) -> Optional[int]:
        value = self.config.get("train.epochs")
        return int(value) if isinstance(value, int) else None

    @property
    def status(self) -> str:
        if self.test:
            return "finished"
        done = len({r.get("epoch") for r in self.epochs})
        return f"incomplete ({done}/{self.planned_epochs or '?'} epochs)"

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch report's scalars (the metrics the run ended training with)."""
        last = self.epochs[-1] if self.epochs else {}
        return {k: v for k, v in last.items() if _is_scalar(v)}


def load_run(run: RunDir) -> RunRecord:
    """Read a run's record files where the run lives (nothing is mirrored)."""
    record = RunRecord(run.run_id, run.location)
    if (text := run.read_published(run.meta_path.name)) is not None:
        record.meta = json.loads(text)
    if (text := run.read_published(run.config_path.name)) is not None:
        record.config = flatten(yaml.safe_load(text) or {})
    if (text := run.read_published(run.metrics_path.name)) is not None:
        lines = (json.loads(line) for line in text.splitlines() if line.strip())
        record.epochs = [r for r in lines if "event" not in r and "epoch" in r]
    if (text := run.read_published(run.eval_path.name)) is not None:
        record.test = json.loads(text)
    return record


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def headline(test: dict[str, Any]) -> str:
    """``recall@10 0.1241  ndcg@10 0.0624`` (retrievers) or ``like/auc 0.837 ...`` (rankers)."""
    keys = [k for ending in _HEADLINE for k in test if k.endswith(ending) and not k.startswith("test/fm0/")][:4]
    return "  ".join(f"{_short(k)} {test[k]:.4f}" for k in keys)


def format_list(records: list[RunRecord]) -> str:
    """One row per run: id, kind, created, commit, workers, epochs, status, final loss, test."""
    header = ["run", "kind", "created (UTC)", "commit", "workers", "status", "loss", "test"]
    rows = []
    for r in records:
        loss = r.final.get("loss")
        rows.append([
            r.run_id, str(r.meta.get("kind") or r.config.get("kind") or "?"),
            str(r.meta.get("created", "?")).replace("T", " ").removesuffix("+00:00"),
            str(r.meta.get("git_commit") or "?"), str(r.meta.get("world_size", "?")), r.status,
            _format(loss) if loss is not None else "-", headline(r.test) or "-",
        ])  # fmt: skip
    return _table(header, rows)


def format_compare(records: list[RunRecord], all_config: bool = False) -> str:
    """Runs side by side: the config keys that differ (all with ``all_config``), the run's
    facts, the final epoch's metrics and the test metrics. A ``*`` marks rows that differ."""
    header = ["", *(r.run_id for r in records)]
    sections = []
    keys = sorted(set().union(*(r.config for r in records)))
    config_rows = _rows(keys, [r.config for r in records], all_config)
    sections.append(("config" + ("" if all_config else " (keys that differ; --all for every key)"), config_rows))
    facts = [{"kind": r.meta.get("kind"), "commit": r.meta.get("git_commit"), "created": r.meta.get("created"),
              "workers": r.meta.get("world_size"), "restarts": r.meta.get("restarts", 0), "status": r.status,
              **{f"version.{k}": v for k, v in (r.meta.get("versions") or {}).items()}}
             for r in records]  # fmt: skip
    sections.append(("run", _rows(list(facts[0]), facts, True)))
    finals = [r.final for r in records]
    skip = ("epoch", "examples_digest")
    final_keys = sorted({k for f in finals for k in f if k not in skip}, key=_metric_order)
    sections.append(("final epoch", _rows(final_keys, finals, True)))
    tests = [r.test for r in records]
    sections.append(("test (eval.json)", _rows(sorted(set().union(*tests), key=_metric_order), tests, True)))
    out = []
    for title, rows in sections:
        if rows:
            out.append(f"== {title}")
            out.append(_table(header, rows))
    return "\n".join(out)


def _rows(keys: list[str], values: list[dict[str, Any]], keep_same: bool) -> list[list[str]]:
    rows = []
    for key in keys:
        cells = [_format(v.get(key)) for v in values]
        differs = len(set(cells)) > 1
        if differs or keep_same:
            rows.append([("* " if differs else "  ") + key, *cells])
    return rows


def _metric_order(key: str) -> tuple[int, str]:
    """Headline metrics first, then the rest by name."""
    for rank, ending in enumerate(("loss", *_HEADLINE)):
        if key.endswith(ending):
            return rank, key
    return len(_HEADLINE) + 1, key


def _short(key: str) -> str:
    return key.removeprefix("test/").removeprefix("fm1/")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
