"""Quiet logs: rayrec's progress at INFO, the libraries' chatter only when it matters.

TorchRec's planner prints a 100-line sharding table per rank, fbgemm logs every library it
loads, and several deprecation warnings fire on every step; a user watching a training job
should see rayrec's progress lines. ``RAYREC_DEBUG=1`` keeps everything.
"""

from __future__ import annotations

import logging
import os
import warnings

_NOISY_LOGGERS = ("torchrec", "fbgemm_gpu", "root", "torch.distributed", "ray.data")
_NOISY_WARNINGS = (
    r".*ShardedTensor.*",
    r".*broadcast_buffers.*",
    r".*TopologyFactory.*",
    r".*is_fx_tracing.*",
    r".*non-writable.*",
    r".*dense_tensor_estimate.*",
)


def configure_logging(level: int = logging.INFO) -> None:
    """Set rayrec's loggers to ``level`` and the noisy libraries to ERROR (unless RAYREC_DEBUG)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("rayrec").setLevel(level)
    if os.environ.get("RAYREC_DEBUG"):
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
