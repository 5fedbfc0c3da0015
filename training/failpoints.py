"""Fail points: named places where a test makes this process die the way a preempted node does.

A fail point is one line in the code, ``failpoint("checkpoint.upload", rank=rank, epoch=epoch)``,
that does nothing unless the environment arms it (the practice of TiKV's and FoundationDB's
fail points). Armed and matched, the process claims a marker file and SIGKILLs itself, so no
``finally``, ``atexit`` or temp-folder cleanup runs: what is left on disk is what a killed
machine leaves.

Spec (``RAYREC_FAILPOINTS``): entries separated by ``;``, each a fail point name optionally
followed by ``@`` and comma-separated ``key=value`` conditions; an entry matches a call when
every condition equals ``str()`` of the keyword the call passes (a key the call does not pass
never matches)::

    RAYREC_FAILPOINTS="checkpoint.upload@rank=0,epoch=1"
    RAYREC_FAILPOINTS="checkpoint.after_shards@rank=1;checkpoint.before_report@epoch=2"

Names, keys and values use ``[A-Za-z0-9_.-]``. Each entry fires at most once per marker folder
(``RAYREC_FAILPOINTS_DIR``; ``training.jobs.launch`` sets it to the run's ``failpoints/``): before
killing, the process creates ``<dir>/<entry>.fired`` with ``O_CREAT | O_EXCL``, and a process that
finds the marker already there goes on. So a worker group that Ray Train restarts after the kill
passes the same point, and re-running the same run id does not fire again.

The spec is parsed once, at import; a disarmed ``failpoint`` costs one dict lookup.

Example:
    >>> parse("checkpoint.upload@rank=0,epoch=1")["checkpoint.upload"][0].conditions
    {'rank': '0', 'epoch': '1'}
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "RAYREC_FAILPOINTS"
DIR_ENV = "RAYREC_FAILPOINTS_DIR"

_WORD = re.compile(r"^[A-Za-z0-9_.-]+$")
logger = logging.getLogger("rayrec.failpoints")


@dataclass(frozen=True)
class Rule:
    """One armed entry of the spec.

    Args:
        entry: the entry as written (it names the marker file).
        name: the fail point it arms.
        conditions: ``key -> value`` that a call's context must match.
    """

    entry: str
    name: str
    conditions: dict[str, str]

    def matches(self, context: dict[str, Any]) -> bool:
        return all(key in context and str(context[key]) == value for key, value in self.conditions.items())


def parse(spec: str) -> dict[str, list[Rule]]:
    """``RAYREC_FAILPOINTS`` → ``{name: [Rule, ...]}``; raises ValueError naming a bad entry."""
    rules: dict[str, list[Rule]] = {}
    for entry in (e.strip() for e in spec.split(";")):
        if not entry:
            continue
        name, _, condition_text = entry.partition("@")
        conditions: dict[str, str] = {}
        for condition in filter(None, condition_text.split(",")):
            key, eq, value = condition.partition("=")
            if not eq or not _WORD.match(key) or not _WORD.match(value):
                raise ValueError(f"{ENV}: bad condition {condition!r} in {entry!r} (want key=value)")
            conditions[key] = value
        if not _WORD.match(name):
            raise ValueError(f"{ENV}: bad fail point name {name!r} in {entry!r}")
        rules.setdefault(name, []).append(Rule(entry, name, conditions))
    return rules


_RULES: dict[str, list[Rule]] = parse(os.environ.get(ENV, ""))


def failpoint(name: str, **context: Any) -> None:
    """SIGKILL this process if ``RAYREC_FAILPOINTS`` arms ``name`` for ``context`` and it has
    not fired yet in this marker folder; otherwise return at once."""
    rules = _RULES.get(name)
    if rules is None:
        return
    for rule in rules:
        if rule.matches(context) and _claim(rule, context):
            _die(rule, context)


def worker_env(default_dir: str | Path) -> dict[str, str]:
    """The environment that arms this process's fail points in Ray workers ({} when disarmed).

    Validates the spec here, so a typo fails before any worker starts. The marker folder is
    ``RAYREC_FAILPOINTS_DIR`` when set, else ``default_dir``.
    """
    spec = os.environ.get(ENV, "")
    if not spec.strip():
        return {}
    parse(spec)
    return {ENV: spec, DIR_ENV: os.environ.get(DIR_ENV) or str(default_dir)}


def _claim(rule: Rule, context: dict[str, Any]) -> bool:
    """Create the entry's marker exclusively: True for the one caller that gets to fire."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        raise RuntimeError(f"{ENV} arms {rule.entry!r} but {DIR_ENV} is not set: it would fire on every restart")
    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(Path(directory, rule.entry + ".fired"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        record = {"entry": rule.entry, "pid": os.getpid(), "time": time.time(), "context": context}
        os.write(fd, (json.dumps(record, default=str) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _die(rule: Rule, context: dict[str, Any]) -> None:
    logger.warning("fail point %s fired (%s): SIGKILL pid %d", rule.entry, context, os.getpid())
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
