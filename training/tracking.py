"""Run tracking in TensorBoard: the run's metrics, also as event files in ``runs/<id>/tensorboard/``.

``RunDir.append_metrics`` stays the one place that writes metrics; it hands every record here:

- rank 0's step progress (``{"event": "progress"}``) → ``train/loss``, ``train/examples_per_s``
  at the global step (``epoch * steps_per_epoch + step``);
- an epoch report → each scalar at the epoch number: ``valid/recall@10``, ``mpzch/user/load``...,
  and the unprefixed ones under ``epoch/`` (``epoch/loss``, ``epoch/train_s``);
- the test metrics (``eval.json``) → ``test/...`` at step 0;
- the resolved config (``create_run``) → the text summary ``config`` (TensorBoard's Text tab), so a
  run's settings sit beside its curves.

TensorBoard tags allow ``[-/\w.]`` only: ``@`` becomes ``_at_`` (``valid/recall_at_10``), any
other character ``_``. Lists (MFLI occupancy, HSNN node sizes) and run events (``resumed``) are
left to metrics.jsonl.
View with ``tensorboard --logdir runs`` (``pip install tensorboard``; not a rayrec dependency).

Why tensorboardX: it writes TensorBoard's event format with only numpy and protobuf, and is
already installed with ``ray[train]``; ``torch.utils.tensorboard`` needs the whole
``tensorboard`` package (its server and web app), and MLflow a tracking store and ~30 packages.
Its ``EventsWriter`` is used directly, one file per process, each record written through.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Optional

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("epoch", "steps", "step", "global_step", "examples_digest")

_NOT_IN_TAGS = re.compile(r"[^-/\w.]")  # what TensorBoard (and tensorboardX) refuse in a tag

_writers: dict[Path, Any] = {}
_lock = threading.Lock()


def scalars_of(record: dict[str, Any]) -> Optional[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` for a metrics record, or None for one TensorBoard does not get."""
    event = record.get("event")
    if event == "progress":
        step = record.get("global_step", record.get("step", 0))
        return int(step), {f"train/{k}": float(record[k]) for k in ("loss", "examples_per_s") if k in record}
    if event == "test":
        return 0, {k: float(v) for k, v in record.items() if k != "event" and _is_number(v)}
    if event is None and "epoch" in record:
        values = {k if "/" in k else f"epoch/{k}": float(v) for k, v in record.items()
                  if k not in _NOT_SCALARS and _is_number(v)}  # fmt: skip
        return int(record["epoch"]), values
    return None


def write_scalars(folder: Path, record: dict[str, Any]) -> bool:
    """Append ``record``'s scalars to this process's event file in ``folder``, written through
    and fsynced (a worker that exits right after loses nothing); True when something was written."""
    found = scalars_of(record)
    if not found or not found[1]:
        return False
    from tensorboardX.proto import summary_pb2

    step, values = found
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tensorboard_tag(k), simple_value=v)
                                         for k, v in values.items()])  # fmt: skip
    _write(folder, step, summary)
    return True


def write_text(folder: Path, tag: str, text: str) -> None:
    """Append a text summary (TensorBoard's Text tab renders it as markdown) at step 0; the
    config goes in a code block so YAML keeps its indentation."""
    from tensorboardX.summary import text as text_summary

    _write(folder, 0, text_summary(tag, f"```\n{text}\n```"))


def _write(folder: Path, step: int, summary: Any) -> None:
    """One event, written through to this process's event file in ``folder``."""
    from tensorboardX.proto import event_pb2

    with _lock:
        writer = _writers.get(folder)
        if writer is None:
            # synchronous: SummaryWriter queues events for a thread that a finishing Ray worker
            # never lets drain (the test metrics, written last, were lost)
            from tensorboardX.event_file_writer import EventsWriter

            folder.mkdir(parents=True, exist_ok=True)
            writer = _writers[folder] = EventsWriter(str(folder / "events"), f".{os.getpid()}")
        writer.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        writer.flush()


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a metric key: ``valid/recall@10`` → ``valid/recall_at_10``."""
    return _NOT_IN_TAGS.sub("_", key.replace("@", "_at_"))


def close_writers() -> None:
    """Close this process's event files (tests: every write is already on disk)."""
    with _lock:
        for writer in _writers.values():
            writer.close()
        _writers.clear()


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``folder``'s event files: ``{tag: [(step, value), ...]}`` in file order
    (a check that the files hold what TensorBoard will show; needs no TensorBoard install)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for step, value in _read_values(folder):
        if not value.HasField("tensor"):
            out.setdefault(value.tag, []).append((step, value.simple_value))
    return out


def read_texts(folder: Path) -> dict[str, str]:
    """Every text summary in ``folder``'s event files: ``{tag: text}`` (the last one per tag)."""
    return {value.tag: value.tensor.string_val[0].decode() for _, value in _read_values(folder)
            if value.HasField("tensor") and value.tensor.string_val}  # fmt: skip


def _read_values(folder: Path) -> Iterator[tuple[int, Any]]:
    """``(step, Summary.Value)`` of every event in ``folder``'s event files, in file order."""
    from tensorboardX.proto import event_pb2

    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset + 12 <= len(data):  # TFRecord: u64 length, u32 crc, data, u32 crc
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                yield event.step, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
