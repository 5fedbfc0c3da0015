"""Progress bars on the driver, fed by the Ray Train workers through the run's ``metrics.jsonl``.

The workers' output stays in their own log files (``training.log_setup``), so progress takes
the run's metrics path, the one the epoch reports already take:

- on the workers, :class:`StepProgress` has rank 0 append ``{"event": "progress"}`` records
  (epoch, step, loss, examples/s) at most every :data:`PROGRESS_EVERY_S` seconds, and
  ``{"event": "stage"}`` records for the steps after the epochs (test metrics, serving index);
- on the driver, :class:`TrainingProgress` tails the file while ``TorchTrainer.fit()`` runs
  and draws one :class:`Bar` per epoch, finished with the epoch's loss and validation metrics.

A :class:`Bar` is redrawn in place on a terminal; in a log file or a pipe each bar prints one
line, when it is finished, so a captured run stays short.

Example (driver)::

    with TrainingProgress(run, epochs=5, steps_per_epoch=95):
        trainer.fit()
    #   epoch 1/5 [========================] 95/95  loss 5.857  5,754 ex/s  valid recall@10 0.121  12.2s
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import IO, Any, Optional

from training import storage
from training.runs import PROGRESS_EVENTS, RunDir

PROGRESS_EVERY_S = 2.0  # rank 0 appends at most one progress record this often
_POLL_S = 0.5  # the driver reads metrics.jsonl this often
_WIDTH = 24


def is_progress(record: dict[str, Any]) -> bool:
    """A step-progress or stage record (not an epoch report or a run event)."""
    return record.get("event") in PROGRESS_EVENTS


class Bar:
    """One progress line: ``label [=====>    ] done/total  note``.

    Args:
        label: what is counted, e.g. ``"epoch 1/5"``.
        total: the count at which the bar is full.
        stream: where to draw (stdout by default). On a terminal the line is redrawn in place;
            elsewhere nothing is written until :meth:`finish`.
    """

    def __init__(self, label: str, total: int, stream: Optional[IO[str]] = None, indent: str = "  ") -> None:
        self.label, self.total, self.indent = label, max(int(total), 1), indent
        self.stream = stream or sys.stdout
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self.done, self.note, self._drawn_at, self.closed = 0, "", 0.0, False

    def update(self, done: int, note: str = "") -> None:
        self.done, self.note = int(done), note
        if self.live and time.perf_counter() - self._drawn_at >= 0.1:
            self._draw(end="")

    def finish(self, note: str = "", done: Optional[int] = None, seconds: Optional[float] = None) -> None:
        """Draw the final line and end it, with ``seconds`` (default: since the bar began)."""
        if self.closed:
            return
        self.done = self.total if done is None else int(done)
        self.note = note or self.note
        self._draw(end="\n", seconds=time.perf_counter() - self.started if seconds is None else seconds)
        self.closed = True

    def render(self, seconds: Optional[float] = None) -> str:
        filled = min(_WIDTH, _WIDTH * self.done // self.total)
        arrow = ">" if 0 < filled < _WIDTH else ""
        bar = "=" * filled + arrow + " " * (_WIDTH - filled - len(arrow))
        tail = f"  {seconds:.1f}s" if seconds is not None else ""
        note = f"  {self.note}" if self.note else ""
        return f"{self.indent}{self.label} [{bar}] {self.done}/{self.total}{note}{tail}"

    def _draw(self, end: str, seconds: Optional[float] = None) -> None:
        line = self.render(seconds)
        if self.live:
            self.stream.write("\r\x1b[2K" + line + end)
        else:
            self.stream.write(line + end)
        self.stream.flush()
        self._drawn_at = time.perf_counter()


# ---------------------------------------------------------------- workers: rank 0 records progress
class StepProgress:
    """Rank 0's progress in ``metrics.jsonl`` (at most one record per ``every_s``) and in its log
    file (a line every ``log_every`` steps). Other ranks record nothing.

    Args:
        run: the run folder (``RunDir``) whose metrics the driver tails.
        rank / world: this worker's rank and the world size (rates count all ranks' examples).
        log_every: steps between log lines (``train.log_every``).
        steps_per_epoch: what the driver expects (``fit_on_ray`` passes it in the loop config);
            with it each record carries a ``global_step`` (steps since the run began: TensorBoard's x axis).
    """

    def __init__(self, run: RunDir, rank: int, world: int, log_every: int, steps_per_epoch: Optional[int] = None,
                 every_s: float = PROGRESS_EVERY_S, logger: Optional[logging.Logger] = None) -> None:  # fmt: skip
        self.run, self.rank, self.world, self.log_every, self.every_s = run, rank, world, log_every, every_s
        self.steps_per_epoch = steps_per_epoch
        self.logger = logger or logging.getLogger("rayrec.train")
        self.epoch, self.t0, self.last = 0, time.perf_counter(), 0.0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.t0, self.last = epoch, time.perf_counter(), time.perf_counter()

    def step(self, steps: int, examples: int, loss: float) -> None:
        """After each step: ``steps`` and ``examples`` so far this epoch on this rank, mean loss."""
        if self.rank != 0:
            return
        now = time.perf_counter()
        rate = examples * self.world / max(now - self.t0, 1e-9)
        if steps % self.log_every == 0:
            self.logger.info("epoch %d step %d loss %.4f (%.0f examples/s)", self.epoch, steps, loss, rate)
        if now - self.last >= self.every_s:
            record = {"event": "progress", "epoch": self.epoch, "step": steps, "loss": loss, "examples_per_s": rate}
            if self.steps_per_epoch:
                record["global_step"] = self.epoch * self.steps_per_epoch + steps
            self.run.append_metrics(record)
            self.last = now

    def stage(self, name: str, index: int, of: int) -> None:
        """Entering step ``index`` (1-based) of ``of`` after the epochs, e.g. the serving index."""
        if self.rank == 0:
            self.logger.info("%s (%d/%d)", name, index, of)
            self.run.append_metrics({"event": "stage", "stage": name, "index": index, "of": of})


# ---------------------------------------------------------------- driver: tail metrics.jsonl
def epoch_summary(record: dict[str, Any]) -> str:
    """``loss 5.857  5,754 ex/s  valid recall@10 0.121`` from an epoch report."""
    parts = []
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4g}")
    if "examples_per_s" in record:
        parts.append(f"{record['examples_per_s']:,.0f} ex/s")
    valid = [k for k in record if k.startswith("valid/") and k.endswith("recall@10")]
    valid += [k for k in record if k.startswith("valid/") and k.endswith("/auc")]  # rankers
    valid += [k for k in record if k.startswith("valid/") and k.endswith("ndcg@10")]
    for key in valid[:3]:
        parts.append(f"{key.removeprefix('valid/')} {record[key]:.3f}")
    return "  ".join(parts)


class TrainingProgress:
    """Draw the workers' progress from ``run``'s ``metrics.jsonl`` while training runs.

    A context manager: a thread reads the file every half second (for a run in object storage,
    the published copy) and draws one :class:`Bar` per epoch and one for the steps after the
    epochs. Records already in the file (an earlier attempt of a resumed run) are skipped.

    Args:
        run: the run folder.
        epochs: ``train.epochs``.
        steps_per_epoch: the steps each epoch takes (the bar's total).
    """

    def __init__(self, run: RunDir, epochs: int, steps_per_epoch: int, stream: Optional[IO[str]] = None) -> None:
        self.run, self.epochs, self.steps = run, epochs, max(int(steps_per_epoch), 1)
        self.stream = stream or sys.stdout
        self._seen = 0
        self._bar: Optional[Bar] = None
        self._bar_epoch: Optional[int] = None
        self._stages: list[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "TrainingProgress":
        self._seen = len(self._lines())
        self._thread = threading.Thread(target=self._follow, name="rayrec-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()
        if self._bar is not None and not self._bar.closed:
            if exc_type is None:
                self._bar.finish(", ".join(self._stages) if self._stages else "")
            else:
                self._bar.finish("stopped", done=self._bar.done)

    def poll(self) -> None:
        """Draw what was appended since the last call."""
        lines = self._lines()
        for line in lines[self._seen:]:
            try:
                self._handle(json.loads(line))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                pass  # a record this follower does not draw
        self._seen = len(lines)

    def _follow(self) -> None:
        while not self._stop.wait(_POLL_S):
            try:
                self.poll()
            except OSError:
                pass  # the file is being replaced or not yet published: next time

    def _lines(self) -> list[str]:
        """Complete lines of metrics.jsonl (a line being written is left for the next poll)."""
        try:
            if self.run.uri is not None:
                text = storage.read_bytes(storage.join(self.run.uri, self.run.metrics_path.name)).decode()
            else:
                text = self.run.metrics_path.read_text()
        except (FileNotFoundError, OSError):
            return []
        lines = text.split("\n")
        return [line for line in lines[:-1] if line.strip()]  # the last piece is "" or unfinished

    def _handle(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "progress":
            epoch = int(record["epoch"])
            bar = self._epoch_bar(epoch)
            bar.update(record["step"], f"loss {record['loss']:.4g}  {record['examples_per_s']:,.0f} ex/s")
        elif event == "stage":
            if self._bar_epoch != -1:
                self._close_bar()
                self._bar, self._bar_epoch = Bar("after training", int(record["of"]), self.stream), -1
            self._stages.append(record["stage"])
            self._bar.update(int(record["index"]) - 1, record["stage"])
        elif event == "resumed":
            self._close_bar("interrupted")
            self.stream.write(f"  resumed from a checkpoint at epoch {int(record['epoch']) + 1}\n")
            self.stream.flush()
        elif event is None and "epoch" in record:
            bar = self._epoch_bar(int(record["epoch"]))
            bar.finish(epoch_summary(record), done=int(record.get("steps", bar.total)), seconds=record.get("train_s"))

    def _epoch_bar(self, epoch: int) -> Bar:
        if self._bar_epoch != epoch or self._bar is None or self._bar.closed:
            self._close_bar()
            self._bar = Bar(f"epoch {epoch + 1}/{self.epochs}", self.steps, self.stream)
            self._bar_epoch = epoch
        return self._bar

    def _close_bar(self, note: str = "") -> None:
        if self._bar is not None and not self._bar.closed:
            self._bar.finish(note or self._bar.note, done=self._bar.done)
