"""Training jobs, one recipe per run kind.

``JOBS`` is the one mapping from a config's ``kind`` to its job module. Each module exposes
``CONFIG`` (its pydantic run-config model) and ``run(cfg, run_id=None, config_stem="run") ->
RunDir``.
"""

JOBS: dict[str, str] = {
    "two_tower": "training.jobs.train_retrieval",
    "mfli": "training.jobs.train_mfli",
    "hsnn": "training.jobs.train_hsnn",
    "ranker": "training.jobs.train_ranker",
}
