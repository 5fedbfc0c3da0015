"""benchmarks/bench_quality.py re-measuring one system keeps the others' rows and lines (--keep):
run on the committed docs/benchmarks/quality.{md,json}, with two_tower_seq re-measured."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_quality  # noqa: E402


def test_remeasuring_one_system_keeps_the_other_systems(tmp_path: Path):
    for name in ("quality.md", "quality.json"):
        shutil.copy(REPO / "docs" / "benchmarks" / name, tmp_path / name)
    before = json.loads((tmp_path / "quality.json").read_text())["rows"]
    results = {"two_tower_seq": {"test": {m: [0.2, 0.21, 0.22] for m in bench_quality.METRICS},
                                 "valid": {m: [0.3, 0.3, 0.3] for m in bench_quality.METRICS}, "runs": ["a", "b", "c"]},
               "popularity": {"test": {m: [0.05] * 3 for m in bench_quality.METRICS},
                              "valid": {m: [] for m in bench_quality.METRICS}, "runs": ["a", "b", "c"]}}
    rows = bench_quality.to_rows(results, [42, 0, 1])
    kept_rows, kept_lines = bench_quality.kept_from(tmp_path, rows)
    assert {r["system"] for r in kept_rows} >= {"two_tower", "bpr", "sasrec"}  # peers too, when not re-read
    assert not {r["system"] for r in kept_rows} & {"two_tower_seq", "popularity"}  # never two rows of one system
    assert kept_rows == [r for r in before if r["system"] in {r["system"] for r in kept_rows}]
    md = bench_quality.report(results, [], [42, 0, 1], "cmd", "now", {"cpu": "x", "cores": 2, "load_average_at_start": 0},
                              kept_lines)
    lines = md.splitlines()
    assert sum(line.startswith("| two_tower |") for line in lines) == 2  # results and SASRec-ratio tables
    assert sum(line.startswith("| two_tower_seq |") for line in lines) == 2
    assert any(line.startswith("| two_tower_seq | 0.2100 ± 0.0058") for line in lines)
    assert sum(line.startswith("- two_tower: ") for line in lines) == 2  # tuning note and runs line
    assert any(line.startswith("Kept from an earlier report") and "two_tower" in line for line in lines)
    # kept twice: the row still names where it was measured, not the report that kept it
    sources = json.loads(kept_lines["_sources"][0])
    previous = json.loads((tmp_path / "quality.json").read_text())
    assert sources["two_tower"]["command"] == previous.get("sources", {}).get("two_tower", previous)["command"]
    (tmp_path / "quality.json").write_text(json.dumps({"command": "keeper", "rows": [*kept_rows, *rows], "sources": sources}))
    (tmp_path / "quality.md").write_text(md)
    _, again = bench_quality.kept_from(tmp_path, [r for r in rows if r["system"] != "two_tower_seq"])
    assert json.loads(again["_sources"][0])["two_tower"] == sources["two_tower"]
    # the kept systems' rows come before this run's in each table
    assert lines.index(next(x for x in lines if x.startswith("| two_tower |"))) < lines.index(
        next(x for x in lines if x.startswith("| two_tower_seq |")))
