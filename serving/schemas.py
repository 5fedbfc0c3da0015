"""HTTP request/response models of the serving API (the OpenAPI schema at /openapi.json).

Fields are strict (``"5"`` is not an int, ``1`` is not a bool) and unknown fields are rejected,
so a client's typo fails loudly with a 422 naming the field instead of being silently ignored.
IDs are raw 64-bit IDs, bounded to int64 so nothing past validation can overflow.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from training.retrieval.protocol import PAD_ITEM_ID

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_K = 1000
MAX_FEEDBACK_EVENTS = 256
MAX_CONTEXT_ENTRIES = 16
MAX_NEW_ITEMS = 256
MAX_CANDIDATE_SET = 2**31 - 1  # a candidate set is at most the catalogue; int32 keeps it a plain number

# RecommendRequest.context: flat, typed and bounded like every other field (a free-form dict
# would take nesting, NaN and unbounded keys to whatever reads it)
ContextKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
ContextValue = (
    Annotated[str, StringConstraints(max_length=256)]
    | bool
    | Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
    | Annotated[float, Field(allow_inf_nan=False)]
)


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: int = Field(ge=INT64_MIN, le=INT64_MAX, description="Raw user ID (int64).")
    k: int = Field(
        default=10, ge=1, le=MAX_K,
        description="Number of items to return. An app with a ranker orders its `num_candidates` retrieved "
        "candidates (50 by default) and answers 422 for a larger k; retrieval-only apps take up to 1000.",
    )  # fmt: skip
    exclude_seen: bool = Field(
        default=True, description="Leave out items the user already rated (train + valid)."
    )
    context: dict[ContextKey, ContextValue] | None = Field(
        default=None, max_length=MAX_CONTEXT_ENTRIES,
        description='Request context, e.g. {"surface": "home", "device": "ios"}: up to 16 entries, keys of '
        "1-64 letters, digits, `_.-`, values strings (up to 256 characters), numbers or booleans. Passed to the "
        "ranker stage with the candidates; the ranking models shipped today read no context feature, so it "
        "changes no score yet. Retrieval ignores it.",
    )  # fmt: skip


class FeedbackEventIn(BaseModel):
    """One impression or engagement."""

    model_config = ConfigDict(extra="forbid", strict=True)

    event_id: str = Field(
        min_length=1, max_length=128,
        description="Client-chosen unique ID (idempotency key): resending it never logs the event twice.",
    )
    user_id: int = Field(ge=INT64_MIN, le=INT64_MAX)
    item_id: int = Field(ge=INT64_MIN, le=INT64_MAX)
    event: str = Field(
        pattern=r"^[a-z_]{1,32}$",
        description='Kind, e.g. "impression", "click", "engagement", or "session_start" (an app open, before the '
        "session's first /recommend: precompute starts on the user; item_id ignored, send 0).",
    )
    timestamp: int = Field(ge=0, le=INT64_MAX, description="When it happened (unix seconds).")
    request_id: str = Field(default="", max_length=128, description="The /recommend response that showed the item.")
    # What counterfactual evaluation needs to reweight a logged event (propensity by position,
    # pool size, which models chose the list); copy them from the /recommend answer that showed
    # the item (``serving.client.event_from``). Optional: events from older clients still log.
    model_version: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="The `model_version` (retrieval index) of the /recommend answer that showed the item.",
    )
    ranker_version: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="The answer's `ranker_version` (null or absent: retrieval-only or not known).",
    )
    fm_version: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="The answer's `fm_version`: the foundation model whose features ranked it.",
    )
    position: int | None = Field(
        default=None, ge=0, lt=MAX_K,
        description="0-based rank at which the item was shown (its index in the answer's `items`).",
    )
    candidates: int | None = Field(
        default=None, ge=1, le=MAX_CANDIDATE_SET,
        description="Size of the candidate set the shown list was chosen from (the answer's `candidates`).",
    )


class FeedbackRequest(BaseModel):
    """Body of ``POST /feedback``: up to 256 events (and within the body size limit)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[FeedbackEventIn] = Field(min_length=1, max_length=MAX_FEEDBACK_EVENTS)


Genre = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class NewItem(BaseModel):
    """One item for ``POST /items``: its ID and the content the run's content encoder reads."""

    model_config = ConfigDict(extra="forbid", strict=True)

    item_id: int = Field(ge=INT64_MIN, le=INT64_MAX, description="Raw item ID (int64), new to the run.")
    title: str = Field(
        min_length=1, max_length=512,
        description='Title, e.g. "Toy Story (1995)": shown with the item, and its words are content tokens.',
    )  # fmt: skip
    genres: list[Genre] = Field(default_factory=list, max_length=32, description='Genre names, e.g. ["Animation"].')
    year: int | None = Field(default=None, ge=1800, le=2200, description="Release year (null: unknown).")

    @field_validator("item_id")
    @classmethod
    def _not_padding(cls, value: int) -> int:
        if value == PAD_ITEM_ID:
            raise ValueError(f"item_id {PAD_ITEM_ID} is reserved (the index pads short result lists with it)")
        return value


class ItemsRequest(BaseModel):
    """Body of ``POST /items``: up to 256 new items, each ID once."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[NewItem] = Field(min_length=1, max_length=MAX_NEW_ITEMS)

    @model_validator(mode="after")
    def _unique_ids(self) -> "ItemsRequest":
        ids = [item.item_id for item in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("items: each item_id may appear once per request")
        return self


class ItemsResponse(BaseModel):
    """The answer to ``POST /items`` and ``DELETE /items/{id}``: durable, and where applied."""

    accepted: int = Field(description="Item changes now durable in the catalogue log.")
    replicas_applied: int = Field(description="Ingress replicas that applied them before this answer.")
    replicas: int = Field(description="Ingress replicas following the live board when it answered.")


class FeedbackResponse(BaseModel):
    accepted: int = Field(description="Events now durable in the log (acknowledged).")


class RecommendedItem(BaseModel):
    item_id: int = Field(description="Raw item ID.")
    title: str | None = Field(description="Title from the dataset's items.parquet; null if unknown.")
    score: float = Field(
        description="Dot product of user and item embeddings; the item's interaction count for "
        "the popularity fallback."
    )


class RecommendResponse(BaseModel):
    """Items best first. Fewer than k items when the catalogue (minus seen items) runs out."""

    user_id: int
    items: list[RecommendedItem]
    fallback: Literal["popularity", "live_history"] | None = Field(
        description='"popularity" when the user is unknown to the model and got the most '
        'popular items instead (minus any they engaged with live); "live_history" when the model does not '
        "know the user but they engaged since export: items near those they engaged with, not ranked; "
        "null for personalised results."
    )
    model_version: str = Field(description='The index version, "<run-id>/epoch-NNNN".')
    index: Literal["exact", "mfli", "hsnn"] | None = Field(
        default=None,
        description="The retriever's search: exact, or the learned MFLI/HSNN index the run trained; "
        "null for the popularity fallback.",
    )
    request_id: str = Field(description="ID of this answer; send it back with /feedback events.")
    ranker_version: str | None = Field(
        default=None, description="The ranker's version; null when the run is retrieval-only."
    )
    fm_version: str | None = Field(
        default=None,
        description="The foundation model whose features the ranker read (null: no FM, `fm_mode` off, or not ranked).",
    )
    candidates: int = Field(
        default=0,
        description="How many candidates the items were chosen from: the retrieved candidates the ranker "
        "ordered, or, unranked, the items returned (retrieval's order is the final one). Send it back with "
        "/feedback events, with each item's 0-based `position`.",
    )
    fm_from_cache: float | None = Field(
        default=None,
        description="Share of the ranked candidates whose foundation-model feature came from the "
        "precompute cache (the rest took the ranker's missing-FM path); null without a cache read.",
    )
    timings_ms: dict[str, float] = Field(
        description="Server-side time: retrieve (ingress → retriever and back, incl. batching "
        "wait), search (the batch's torch search), rank (ingress → ranker and back), fm (getting FM "
        "features in the ranker) and score (the ranker batch's forward pass), when a ranker is present; "
        "total (whole request in the ingress)."
    )


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    model_version: str = Field(description="The retrieval index version.")
    num_items: int
    num_users: int
    index: Literal["exact", "mfli", "hsnn"] | None = Field(
        default=None, description='The search backend answering known users: "exact", "mfli" or "hsnn".'
    )
    beam: int | None = Field(default=None, description="The learned index's beam width; null for exact search.")
    ranker_version: str | None = None
    fm_version: str | None = None
    fm_mode: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx this API writes itself carries a human-readable ``detail``."""

    detail: str | list | dict


MAX_HISTORY = 200


class HistoryItem(BaseModel):
    item_id: int = Field(description="Raw item ID.")
    title: str | None = Field(description="Title from the dataset's items.parquet; null if unknown.")


class HistoryResponse(BaseModel):
    """Body of ``GET /users/{user_id}/history``: the user's most recent items, newest first."""

    user_id: int
    items: list[HistoryItem] = Field(
        description="The last `limit` items of the user's history, newest first: what the run saw them rate "
        "(train + valid) followed by what they clicked or engaged with since, acknowledged by /feedback "
        "(the items /recommend excludes); empty for a known user with no history."
    )
    total: int = Field(description="How many items the history holds in all (run + live).")
    live: int = Field(default=0, description="How many of them came from /feedback since the run was exported.")


class CandidatesResponse(BaseModel):
    """Body of ``GET /users/{user_id}/candidates``: what retrieval hands the ranker, before ranking."""

    user_id: int
    items: list[RecommendedItem] = Field(description="Retrieved candidates by retrieval score, best first.")
    fallback: Literal["popularity", "live_history"] | None
    index: Literal["exact", "mfli", "hsnn"] | None = None
