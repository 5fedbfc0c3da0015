"""The parts of ``/work/shared/specs/benchmark-results.md`` every benchmark writes the same way:
the machine, package versions and commit a run is stamped with, and one measured row.

Benchmarks are scripts run from ``benchmarks/`` (``make bench-*``), so they import this as
``results``; Python puts the script's folder on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU model, cores, memory, GPU (None: these runs are CPU-only) and the load average at the
    start, since the project's machine is often shared and absolute timings depend on it."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except OSError:
        mem_kib = 0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20), "gpu": None,
            "load_average_at_start": round(os.getloadavg()[0], 2)}


def versions(distributions: dict[str, str]) -> dict:
    """``{key: installed version or None}`` for ``{key: distribution name}``."""
    out = {}
    for key, dist in distributions.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def git_commit() -> str | None:
    """The checkout's short commit (None outside git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() or None


def row(system: str, dataset: str, metric: str, value, note_if_null: str | None = None, **params) -> dict:
    """One measured number; ``value`` None gets a ``note`` saying why it is missing."""
    out = {"system": system, "dataset": dataset, "metric": metric,
           "value": None if value is None else round(float(value), 3), "params": params}
    if value is None:
        out["note"] = note_if_null or "not measured (no successful requests or not applicable)"
    return out


def provenance(report: dict) -> str:
    """The sentence a report's markdown opens with: the command, commit, date, machine and load."""
    m = report["machine"]
    return (f"Command: `{report['command']}`; commit `{report['git_commit']}`; {report['date']}; {m['cpu']}, "
            f"{m['cores']} cores, {m['memory_gib']} GiB, no GPU; load average at start {m['load_average_at_start']}.")


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample std / sqrt(n)) of per-seed values; SE None for one value."""
    n = len(values)
    mean = sum(values) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
    return float(mean), se


def pm(pair: tuple[float, float | None] | None, digits: int = 3, sign: bool = False) -> str:
    """``mean ± se`` as a table cell (``–`` for no value; no ``±`` for one seed); ``sign`` for gains."""
    if pair is None:
        return "–"
    mean, se = pair
    return f"{mean:{'+' if sign else ''}.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")
