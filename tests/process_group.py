"""Process groups for tests that spawn their own ranks (outside Ray Train)."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def join_group(rank: int, world: int, store: str) -> None:
    """A gloo group met through a file store: a TCP port picked free in the parent can be taken
    by the session's Ray before the ranks bind it."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def leave_group() -> None:
    """Destroy the group and exit the process without the interpreter's teardown.

    Why: about one spawned rank in 25 aborts *after* its work is saved, in a C++ static
    destructor at exit ("terminate called without an active exception", no Python frame left),
    which mp.spawn reports as a SIGABRT failure. The results are on disk by then, so skipping the
    teardown loses nothing and keeps the tests about their subject, not about torch's exit path.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
