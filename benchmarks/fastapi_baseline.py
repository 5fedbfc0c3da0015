"""The serving benchmark's no-Ray baseline: the same retrieve + rank behind one plain
uvicorn/FastAPI process (system ``fastapi_inprocess`` in ``serving.json``).

It loads what the Serve app serves (``serving.retriever.RetrievalIndex`` and
``serving.ranker.RankingStage`` over the same run and ranker, one torch thread) and answers
``POST /recommend`` with the same request and response models, titles included. Each request is
one retrieval of ``num_candidates`` items and one ranking pass over them, in FastAPI's thread
pool (a sync route), the way a plain FastAPI service would be written: no Ray, no batching
across requests, no FM (there is no precompute cache here; ranking takes the missing-FM path,
which costs the same forward pass as a cache hit).

Run (``bench_serving.py`` starts it as a subprocess)::

    python benchmarks/fastapi_baseline.py --run runs/<id> --ranker-run runs/<ranker-id> --port 8361
"""

# No ``from __future__ import annotations``: FastAPI reads the route annotations as classes.
import argparse
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(run_dir: Path, factory: str, ranker_run: Path | None, num_candidates: int):
    """The FastAPI app: the run's index and ranking stage, loaded in this process."""
    import torch
    from fastapi import FastAPI

    from serving.ranker import RankingStage, RankQuery
    from serving.ranking_models import resolve_factory
    from serving.retriever import Query, RetrievalIndex
    from serving.run_index import index_dir, read_meta, read_titles, resolve_dataset_dir
    from serving.schemas import RecommendedItem, RecommendRequest, RecommendResponse

    torch.set_num_threads(1)
    index_path = index_dir(run_dir)
    meta = read_meta(index_path)
    index = RetrievalIndex(index_path)
    stage = RankingStage(resolve_factory(factory)(str(ranker_run or run_dir)))
    titles = read_titles(Path(resolve_dataset_dir(meta, index_path)))
    app = FastAPI(title="rayrec baseline (no Ray)")

    @app.post("/recommend", response_model=RecommendResponse)
    def recommend(body: RecommendRequest) -> RecommendResponse:
        start = time.perf_counter()
        answer = index.search([Query(body.user_id, num_candidates, body.exclude_seen)])[0]
        item_ids, scores = answer.item_ids[: body.k], answer.scores[: body.k]
        if answer.fallback is None:
            (item_ids, scores), = stage.rank([RankQuery(body.user_id, answer.item_ids, body.k)], None, None)
        return RecommendResponse(
            user_id=body.user_id,
            items=[RecommendedItem(item_id=i, title=titles.get(i), score=s) for i, s in zip(item_ids, scores)],
            fallback=answer.fallback, model_version=meta.version, index=answer.index, request_id=uuid.uuid4().hex,
            ranker_version=stage.models.version, timings_ms={"total": (time.perf_counter() - start) * 1e3},
        )  # fmt: skip

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--ranker-run", default=None)
    parser.add_argument("--factory", default="serving.ranking_models:load_run_models")
    parser.add_argument("--num-candidates", type=int, default=50)
    parser.add_argument("--port", type=int, default=8361)
    args = parser.parse_args()
    import uvicorn

    app = build(Path(args.run), args.factory, Path(args.ranker_run) if args.ranker_run else None, args.num_candidates)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
