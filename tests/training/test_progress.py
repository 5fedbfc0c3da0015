"""training.progress: rank 0's progress records and the driver's bars drawn from metrics.jsonl.

No Ray here: a RunDir on local disk stands for the run, records are appended the way rank 0
appends them, and the follower is polled by hand.
"""

from __future__ import annotations

import io

from training.progress import Bar, StepProgress, TrainingProgress, epoch_summary
from training.runs import RunDir


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_in_a_log_prints_one_line_when_finished():
    out = io.StringIO()
    bar = Bar("epoch 1/2", 10, out)
    bar.update(3, "loss 1.0")
    assert out.getvalue() == ""
    bar.finish("loss 0.5", seconds=2.0)
    assert out.getvalue() == "  epoch 1/2 [========================] 10/10  loss 0.5  2.0s\n"


def test_bar_on_a_terminal_redraws_in_place():
    out = _Tty()
    bar = Bar("epoch 1/2", 8, out)
    bar.update(2, "loss 1.0")
    assert out.getvalue().startswith("\r\x1b[2K  epoch 1/2 [======>") and "2/8  loss 1.0" in out.getvalue()
    bar.finish(seconds=1.0)
    assert out.getvalue().endswith("8/8  loss 1.0  1.0s\n") and out.getvalue().count("\n") == 1


def test_step_progress_rank0_only_throttled_and_hidden_from_read_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    for rank in (0, 1):
        progress = StepProgress(run, rank, world=2, log_every=100, every_s=0.0)
        progress.start_epoch(0)
        progress.step(1, 64, 2.0)
        progress.stage("test metrics", 1, 2)
    slow = StepProgress(run, 0, world=2, log_every=100, every_s=3600.0)
    slow.start_epoch(1)
    slow.step(1, 64, 2.0)  # within the interval: nothing written
    run.append_metrics({"epoch": 0, "steps": 1, "loss": 2.0})
    records = list(run.read_metrics(progress=True))
    assert [r.get("event") for r in records] == ["progress", "stage", None]
    assert records[0]["epoch"] == 0 and records[0]["step"] == 1 and records[0]["loss"] == 2.0
    assert list(run.read_metrics()) == [{"epoch": 0, "steps": 1, "loss": 2.0}]


def test_follower_draws_an_epoch_bar_per_report_and_the_steps_after(tmp_path):
    run = RunDir(tmp_path / "run")
    run.append_metrics({"epoch": 0, "loss": 9.0})  # an earlier attempt's record: not drawn again
    out = io.StringIO()
    follower = TrainingProgress(run, epochs=2, steps_per_epoch=4, stream=out)
    follower._seen = len(follower._lines())
    run.append_metrics({"event": "progress", "epoch": 0, "step": 2, "loss": 3.0, "examples_per_s": 1000.0})
    run.append_metrics({"epoch": 0, "steps": 4, "loss": 2.5, "examples_per_s": 1200.0, "train_s": 3.0,
                        "valid/recall@10": 0.12, "valid/ndcg@10": 0.05, "valid/mrr@10": 0.01})
    run.append_metrics({"event": "resumed", "epoch": 1})
    run.append_metrics({"epoch": 1, "steps": 4, "loss": 2.0, "train_s": 2.0})
    run.append_metrics({"event": "stage", "stage": "test metrics", "index": 1, "of": 2})
    run.append_metrics({"event": "stage", "stage": "serving index", "index": 2, "of": 2})
    follower.poll()
    follower.__exit__(None, None, None)
    lines = out.getvalue().splitlines()
    assert lines[0] == ("  epoch 1/2 [========================] 4/4  loss 2.5  1,200 ex/s  recall@10 0.120  "
                        "ndcg@10 0.050  3.0s")
    assert lines[1] == "  resumed from a checkpoint at epoch 2"
    assert lines[2].startswith("  epoch 2/2 [") and "4/4  loss 2" in lines[2]
    assert lines[3].startswith("  after training [========================] 2/2  test metrics, serving index")
    assert len(lines) == 4


def test_follower_ignores_an_unfinished_line(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics_path.write_text('{"epoch": 0, "steps": 4, "loss": 2.5}\n{"event": "prog')
    follower = TrainingProgress(run, epochs=1, steps_per_epoch=4, stream=io.StringIO())
    assert len(follower._lines()) == 1


def test_epoch_summary_names_the_headline_metrics():
    assert epoch_summary({"loss": 0.51234, "examples_per_s": 12345.6, "valid/like/auc": 0.8}) == (
        "loss 0.5123  12,346 ex/s  like/auc 0.800"
    )
