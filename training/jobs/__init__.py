"""Training jobs, one recipe per run kind. ``JOBS`` maps a config's ``kind`` to its module,
which exposes ``run(cfg, run_id=None, config_stem="run") -> RunDir``."""

JOBS: dict[str, str] = {
    "two_tower": "training.jobs.train_retrieval",
}
