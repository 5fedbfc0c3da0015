"""``GET /ui``: a page for looking at what the recommender does for one user, and the two reads
behind it that ``/recommend`` does not answer (a user's history, the retrieved candidates).

The page (``serving/ui_static/ui.html``, shipped as package data) is plain HTML and ``fetch()``
against the app's own JSON API, with no build step: what it shows is exactly what a client of
the API gets, so the browser test can compare the two. It calls:

    GET  /users/{id}/history?limit=20   the user's most recent items, newest first (404: unknown)
    GET  /users/{id}/candidates         retrieval's candidates before ranking
    POST /recommend                     the ranked list, per-stage ``timings_ms``, ``fm_from_cache``
    POST /feedback                      one impression or click per button, and its ack

The routes are thin methods on the Ingress (``serving.ingress``) calling the functions here. Why
there rather than a separate deployment: the page is one static file, and the data it reads
(seen items, titles, the index) already lives in each Ingress replica; a second deployment would
hold a second copy or add a hop.

History comes from what the replica already holds, the run's ``seen.parquet``
(``serving.run_index.SeenItems``): training writes it as the train split, sorted by
``(user, timestamp)``, then the valid split (each user's second-to-last item), and SeenItems
keeps that order per user, so a user's last rows are their most recent. The file has no
timestamps, so none are shown. After those come the user's live items (clicks and engagements
acknowledged since export, ``serving.live_history``), which are newer than anything in the file.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import torch
from fastapi.responses import HTMLResponse

from serving.retriever import Query, Recommendation, RetrievalIndex
from serving.schemas import CandidatesResponse, HistoryItem, HistoryResponse, RecommendedItem

EXAMPLE_USERS = 4
"""Known users the page offers as examples (the first few with a history, by raw ID)."""


@functools.cache
def _template() -> str:
    """The page's one file, read once per process from the installed package (so it works from
    a wheel or a checkout)."""
    return resources.files("serving").joinpath("ui_static/ui.html").read_text(encoding="utf-8")


def page(examples: list[int]) -> HTMLResponse:
    """The page with this run's example users filled in."""
    return HTMLResponse(_template().replace("/*EXAMPLE_USERS*/[]", json.dumps(examples)), headers={"Cache-Control": "no-cache"})


def is_known(index: RetrievalIndex, user_id: int) -> bool:
    """Whether the app knows the user: an embedding, a seen item, or a live one."""
    ids = torch.tensor([user_id], dtype=torch.int64)
    _, known = index.backend.users.lookup(ids)
    live = index.live is not None and bool(index.live.items(user_id))
    return bool(known[0]) or live or index.seen.for_users(ids)[0].numel() > 0


def user_history(index: RetrievalIndex, titles: dict[int, str], user_id: int, limit: int) -> HistoryResponse | None:
    """The user's last ``limit`` items, run then live, newest first; None for a user the app
    does not know."""
    if not is_known(index, user_id):
        return None
    seen = index.seen.for_users(torch.tensor([user_id], dtype=torch.int64))[0].tolist()  # [S] oldest first
    live = index.live.items(user_id) if index.live is not None else []  # [L] oldest first
    again = set(live)  # an item engaged with again shows once, where it is newest
    history = [i for i in seen if i not in again] + live
    recent = history[::-1][:limit]  # [<=limit] newest first
    return HistoryResponse(
        user_id=user_id,
        items=[HistoryItem(item_id=i, title=titles.get(i)) for i in recent],
        total=len(history),
        live=len(live),
    )


def candidates(index: RetrievalIndex, titles: dict[int, str], user_id: int, k: int) -> CandidatesResponse:
    """Retrieval alone for one user (seen items excluded, as /recommend retrieves them)."""
    answer: Recommendation = index.search([Query(user_id=user_id, k=k, exclude_seen=True)])[0]
    return CandidatesResponse(
        user_id=user_id,
        items=[RecommendedItem(item_id=i, title=titles.get(i), score=s) for i, s in zip(answer.item_ids, answer.scores)],
        fallback=answer.fallback,
        index=answer.index,
    )


def example_users(index: RetrievalIndex, n: int = EXAMPLE_USERS) -> list[int]:
    """A few known users with a history, for the page's example buttons."""
    return index.seen.users[:n].tolist()
