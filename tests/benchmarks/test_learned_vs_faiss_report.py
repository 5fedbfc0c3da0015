"""``bench_learned_vs_faiss.py --only KIND`` keeps the other index's section of the report."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.learned_vs_faiss_report import old_section  # noqa: E402

MARKED = """# title

<!-- part mfli: begin -->
## MFLI (vectors = x)

mfli body
<!-- part mfli: end -->
<!-- part hsnn: begin -->
## HSNN (vectors = y)

hsnn body
<!-- part hsnn: end -->
## Not measured here
"""


def test_a_marked_section_is_kept_whole_and_alone():
    assert old_section(MARKED, "mfli") == "<!-- part mfli: begin -->\n## MFLI (vectors = x)\n\nmfli body\n<!-- part mfli: end -->\n"
    assert "mfli body" not in old_section(MARKED, "hsnn") and "hsnn body" in old_section(MARKED, "hsnn")


def test_a_report_from_before_the_markers_is_cut_at_the_next_heading():
    plain = MARKED.replace("<!-- part mfli: begin -->\n", "").replace("<!-- part mfli: end -->\n", "")
    kept = old_section(plain, "mfli")
    assert kept.startswith("<!-- part mfli: begin -->\n## MFLI") and kept.endswith("<!-- part mfli: end -->\n")
    assert "mfli body" in kept and "HSNN" not in kept
    assert old_section("# nothing here\n", "hsnn") is None


def test_probes_reach_every_list_on_ml100k_and_stop_at_the_cap_at_1m():
    from benchmarks.learned_vs_faiss_points import SCALES

    assert SCALES["ml-100k"].nprobes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert SCALES["ml-100k"].nprobes(48) == [1, 2, 4, 8, 16, 32, 48]
    big = SCALES["synth-1m"]
    assert big.nprobes(1024)[-1] == 256 and big.nprobes(4096)[-1] == 256 and len(set(big.nprobes(4096))) == 9
    # the 1M report and its users differ from ml-100k's: another file, a sample the other 1M report uses
    assert big.suffix and big.users == 1000 and SCALES["ml-100k"].suffix == "" and SCALES["ml-100k"].users is None
