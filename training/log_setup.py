"""What a rayrec command prints, and where everything else goes.

By default a command prints rayrec's own lines only: stages, progress bars, answers. Everything
Ray and the libraries say goes to Ray's session log folder (``<ray tmp>/session_*/logs``):

- Ray's workers, actors and Serve replicas keep their output in their own log files there
  (``ray.init(log_to_driver=False)``): Train controllers, Ray Data coordinators, Serve access
  logs, torchrec's warnings in the workers. Training progress reaches the driver through the
  run's ``metrics.jsonl`` instead (``training.progress``).
- The driver's own Ray and Serve loggers write to ``rayrec-driver.log`` in the same folder;
  only their errors stay on the console.

``rayrec --verbose`` (``RAYREC_VERBOSE=1``) forwards it all to the console as Ray does by
default; ``RAYREC_DEBUG=1`` also keeps the libraries' warnings filtered below.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import warnings
from pathlib import Path
from typing import Any, Optional

VERBOSE_ENV = "RAYREC_VERBOSE"
_FORMAT = "%(asctime)s %(name)s %(message)s"
DRIVER_LOG = "rayrec-driver.log"

# Libraries whose INFO/WARNING logging is chatter at rayrec's level: TorchRec's planner prints a
# 100-line sharding table per rank and fbgemm logs every library it loads.
_NOISY_LOGGERS = ("torchrec", "fbgemm_gpu", "root", "torch.distributed", "ray.data")

# Warnings rayrec cannot fix in its own code, filtered by message. Each names its source.
_NOISY_WARNINGS = (
    # torch 2.13 deprecates ShardedTensor (FutureWarning); torchrec 1.8's sharded state_dict
    # still builds them, so every checkpoint save would warn.
    r".*ShardedTensor.*",
    # torchrec 1.8 passes DDP's deprecated `broadcast_buffers` for the dense part of a DMP.
    r".*broadcast_buffers.*",
    # torchrec 1.8 planner: a Topology built directly is deprecated for TopologyFactory, which
    # probes the hardware (GPU bandwidths) that a CPU Topology has none of.
    r".*TopologyFactory.*",
    # torchrec's storage reservation notes the dense tensor estimate on every plan.
    r".*dense_tensor_estimate.*",
    # torchrec 1.8 hash_mc_modules.py builds train_rank_offsets with torch.tensor(tensor): a
    # UserWarning at every MPZCH table construction (training ranks and serving replicas).
    r"To copy construct from a tensor, it is recommended",
)

# Log records (not warnings) filtered by message, for the same reason.
_NOISY_RECORDS = {
    # torch.fx: torchrec's KeyedJaggedTensor asks is_fx_tracing() on every forward; torch 2.13
    # logs once per process that the name is ambiguous. Not rayrec's call to change.
    "torch.fx._symbolic_trace": "is_fx_tracing will return true",
}


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def verbose() -> bool:
    """Whether Ray's and the libraries' output goes to the console too (``--verbose``)."""
    return bool(os.environ.get(VERBOSE_ENV) or os.environ.get("RAYREC_DEBUG"))


def set_verbose(on: bool = True) -> None:
    """Turn ``--verbose`` on for this process and the Ray it starts (an environment variable,
    so every ``ray.init`` below the command sees it)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)


def configure_logging(level: int = logging.INFO) -> None:
    """Set rayrec's loggers to ``level`` and the noisy libraries to ERROR (unless RAYREC_DEBUG)."""
    logging.basicConfig(level=logging.WARNING, format=_FORMAT)
    rayrec = logging.getLogger("rayrec")
    rayrec.setLevel(level)
    if not any(getattr(h, "_rayrec", False) for h in rayrec.handlers):
        # its own handler: the root's may be a library's (an import that logged first set it up)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._rayrec = True  # type: ignore[attr-defined]
        rayrec.addHandler(handler)
        rayrec.propagate = False
    if os.environ.get("RAYREC_DEBUG"):
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, fragment in _NOISY_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(_DropMessage(fragment))


def init_ray(**kwargs: Any) -> None:
    """Start a local Ray, or join the one ``address`` names: the one way rayrec commands do.

    Unless ``--verbose``: the workers' output stays in their log files (``log_to_driver=False``)
    and the driver's Ray logging goes to ``rayrec-driver.log`` in the session's log folder
    (errors still reach the console). Keyword arguments go to ``ray.init``.
    """
    import ray

    kwargs.setdefault("include_dashboard", False)
    if verbose():
        kwargs.setdefault("log_to_driver", True)
        ray.init(**kwargs)
        return
    kwargs.setdefault("log_to_driver", False)
    # what Ray logs while starting (the token authentication notice, "Started a local Ray
    # instance") is held until the session's log folder exists
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    ray_logger = logging.getLogger("ray")
    _console_errors_only(ray_logger)
    ray_logger.addHandler(held)
    try:
        ray.init(**kwargs)
    finally:
        ray_logger.removeHandler(held)
    folder = logs_dir()
    if folder is not None:
        held.setTarget(_driver_log_handler(folder))
        held.flush()
        ray_logger.addHandler(_driver_log_handler(folder))
    held.close()


def quiet_serve_logger() -> None:
    """Serve's driver-side logger ("Started Serve", "Application ... is ready") to the driver
    log file unless ``--verbose``; call after importing ``ray.serve``, which sets it up."""
    if verbose():
        return
    serve_logger = logging.getLogger("ray.serve")
    _console_errors_only(serve_logger)
    folder = logs_dir()
    if folder is not None:
        serve_logger.addHandler(_driver_log_handler(folder))


def owns_ray() -> bool:
    """Whether this process started the Ray it is connected to (a local one that ends with it),
    rather than joining a running cluster."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        return bool(node is not None and node.head)
    except (ImportError, AttributeError):
        return False


def logs_dir() -> Optional[Path]:
    """The Ray session's log folder on this node (None before ``ray.init`` or over Ray Client)."""
    try:
        import ray._private.worker as ray_worker  # no public API names the session folder

        node = ray_worker._global_node
        return Path(node.get_logs_dir_path()) if node is not None else None
    except (ImportError, AttributeError):
        return None


def where_logs_are() -> str:
    """One line for the console: where Ray's and the workers' logs are."""
    folder = logs_dir()
    if verbose():
        return f"Ray's logs: {folder}" if folder else "Ray's logs: the cluster's session folder"
    where = str(folder) if folder else "the Ray cluster's session log folder"
    return f"Ray's logs: {where} (--verbose shows them here)"


def _console_errors_only(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
        elif type(handler).__name__ == "PlainRayHandler":  # Ray's console handler (ray._private.log)
            handler.setLevel(logging.ERROR)


_driver_handlers: dict[Path, logging.Handler] = {}


def _driver_log_handler(folder: Path) -> logging.Handler:
    """One file handler per session folder, shared by the loggers routed there."""
    if folder not in _driver_handlers:
        handler = logging.FileHandler(folder / DRIVER_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        _driver_handlers[folder] = handler
    return _driver_handlers[folder]
