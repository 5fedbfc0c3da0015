"""training.log_setup: what reaches the console by default and with --verbose (no Ray started:
``ray.init`` is replaced by a recorder)."""

from __future__ import annotations

import logging
import warnings

import pytest

from training import log_setup


@pytest.fixture
def recorded_init(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(log_setup, "logs_dir", lambda: None)
    handlers = {h: h.level for h in logging.getLogger("ray").handlers}
    yield calls
    for handler, level in handlers.items():  # init_ray quietened Ray's console handler
        handler.setLevel(level)


def test_workers_output_stays_in_the_log_files_unless_verbose(recorded_init, monkeypatch):
    monkeypatch.delenv(log_setup.VERBOSE_ENV, raising=False)
    monkeypatch.delenv("RAYREC_DEBUG", raising=False)
    log_setup.init_ray(address="auto")
    monkeypatch.setenv(log_setup.VERBOSE_ENV, "1")
    log_setup.init_ray()
    assert recorded_init == [
        {"address": "auto", "include_dashboard": False, "log_to_driver": False},
        {"include_dashboard": False, "log_to_driver": True},
    ]


def test_cli_verbose_flag_reaches_init_ray(monkeypatch):
    from cluster.cli import VERBOSE_ENV, build_parser

    assert VERBOSE_ENV == log_setup.VERBOSE_ENV
    parser = build_parser()
    assert parser.parse_args(["demo"]).verbose is False
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    assert parser.parse_args(["-v", "train", "--config", "x.yaml"]).verbose is True


def test_library_chatter_is_filtered_by_message(monkeypatch, caplog):
    monkeypatch.delenv("RAYREC_DEBUG", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        log_setup.configure_logging()
        warnings.warn("To copy construct from a tensor, it is recommended to use sourceTensor.detach().clone()")
        warnings.warn("something rayrec should see")
    assert [str(w.message) for w in seen] == ["something rayrec should see"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torch.fx._symbolic_trace").warning("is_fx_tracing will return true for both ...")
        logging.getLogger("torch.fx._symbolic_trace").warning("another message")
    assert [r.getMessage() for r in caplog.records] == ["another message"]
