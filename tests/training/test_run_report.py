"""``rayrec runs list`` / ``rayrec runs compare`` (training/run_report.py) and the TensorBoard
event files written behind ``RunDir.append_metrics`` (training/tracking.py).

Run folders are written by hand with the same calls the jobs make (create_run, append_metrics,
write_json), so no training runs here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import main
from training.config import load_config
from training.runs import create_run, list_runs, run_dir
from training.tracking import close_writers, read_scalars, read_texts

REPO = Path(__file__).resolve().parents[2]


def _write_run(runs: Path, run_id: str, overrides: list[str], losses: list[float], test: dict | None):
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    run = create_run(cfg, runs, run_id, world_size=2)
    for epoch, loss in enumerate(losses):
        run.append_metrics({"event": "progress", "epoch": epoch, "step": 20, "global_step": 40 * epoch + 20,
                            "loss": loss + 0.5, "examples_per_s": 1000.0})  # fmt: skip
        run.append_metrics({"epoch": epoch, "steps": 40, "loss": loss, "examples_per_s": 1200.0, "train_s": 3.0,
                            "valid/recall@10": 0.1 + epoch / 100, "mfli/occupancy": [[1, 2]], "examples_digest": 7})  # fmt: skip
    if test is not None:
        run.write_json(run.eval_path, test)
    return run


@pytest.fixture
def runs(tmp_path) -> Path:
    folder = tmp_path / "runs"
    _write_run(folder, "a-1", [], [2.0, 1.5], {"test/recall@10": 0.07, "test/ndcg@10": 0.03})
    _write_run(folder, "b-2", ["train.lr=0.01", "train.epochs=3"], [1.9], None)
    (folder / "not-a-run").mkdir()
    yield folder
    close_writers()


def test_runs_list_shows_one_row_per_run_with_status_and_headline(runs, capsys):
    assert [r.run_id for r in list_runs(runs)] == ["a-1", "b-2"]
    assert main(["runs", "list", "--runs-dir", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "kind", "created", "(UTC)", "commit", "workers", "status", "loss", "test"]
    assert lines[2].split()[:2] == ["a-1", "two_tower"]
    assert "finished" in lines[2] and lines[2].rstrip().endswith("recall@10 0.0700  ndcg@10 0.0300")
    assert "incomplete (1/3 epochs)" in lines[3] and " 1.9 " in lines[3]
    assert len(lines) == 4


def test_runs_compare_shows_what_differs_side_by_side(runs, capsys):
    assert main(["runs", "compare", "a-1", str(runs / "b-2"), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines() if line.startswith("* ")}
    assert rows["train.lr"] == ["0.003", "0.01"] and rows["train.epochs"] == ["2", "3"]
    assert "train.batch_size" not in out  # the same in both: shown only with --all
    assert rows["loss"] == ["1.5", "1.9"] and rows["valid/recall@10"] == ["0.11", "0.1"]
    assert rows["test/recall@10"] == ["0.07", "-"] and rows["status"][0] == "finished"
    assert "mfli/occupancy" not in out and "examples_digest" not in out  # lists and digests stay in metrics.jsonl
    assert main(["runs", "compare", "a-1", "b-2", "--all", "--runs-dir", str(runs)]) == 0
    assert "  train.batch_size" in capsys.readouterr().out


def test_runs_compare_names_a_folder_that_is_no_run(runs, capsys):
    assert main(["runs", "compare", "a-1", "not-a-run", "--runs-dir", str(runs)]) == 2
    assert "not-a-run is not a run folder" in capsys.readouterr().err


def test_metrics_reach_tensorboard_event_files_through_append_metrics(runs):
    run = run_dir(runs, "a-1")
    scalars = read_scalars(run.tensorboard_dir)  # on disk as written: a worker may exit any time
    assert scalars["train/loss"] == [(20, 2.5), (60, 2.0)]  # progress records at the global step
    assert scalars["epoch/loss"] == [(0, 2.0), (1, 1.5)]  # epoch reports at the epoch
    assert [v for _, v in scalars["valid/recall_at_10"]] == pytest.approx([0.10, 0.11])  # "@" is no tag character
    assert scalars["test/recall_at_10"] == [(0, pytest.approx(0.07))]  # eval.json
    assert not any(tag.startswith(("mfli/", "epoch/examples_digest", "epoch/steps")) for tag in scalars)


def test_the_resolved_config_reaches_tensorboard_as_text(runs):
    texts = read_texts(run_dir(runs, "b-2").tensorboard_dir)
    config = texts["config/text_summary"]  # TensorBoard's Text tab, beside the curves
    assert config.startswith("```") and "lr: 0.01" in config and "epochs: 3" in config
    assert "lr: 0.003" in read_texts(run_dir(runs, "a-1").tensorboard_dir)["config/text_summary"]
    assert "config/text_summary" not in read_scalars(run_dir(runs, "b-2").tensorboard_dir)
