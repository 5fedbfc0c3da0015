"""The FeedbackSink deployment: ``POST /feedback`` events → durable log → precompute predictor.

``ServingSettings.feedback_replicas`` replicas (1 by default; 2 keep /feedback answering while
one restarts). Several replicas, or two during a rollout, share the log folder safely: each
writes its own segments and compaction deduplicates event ids across writers
(``serving.feedback_log``; ``tests/serving/test_feedback.py`` runs two). Concurrent requests are
grouped by ``@serve.batch`` so one ``fsync`` acknowledges many requests (group commit): the ack
returns only after the fsync. A background task compacts segments into Parquet every
``compact_every_s``; startup compacts whatever a killed predecessor left, and a graceful
shutdown (Serve calls ``__del__``) compacts before the replica exits.

Accepted events are then forwarded, fire-and-forget, to the precompute ``Predictor`` (when the
app has one): a user who engages is about to ask again, so their candidates are worth
precomputing; a ``session_start`` event (``serving.feedback_log.SESSION_START_EVENT``, an app open
before the session's first ``/recommend``) goes to ``Predictor.observe_session_start``, which
precomputes that user first. Forwarding happens after the ack is decided and never fails a request.

Acknowledged clicks and engagements (``serving.live_history.POSITIVE_EVENTS``) are also
published, fire and forget, to the ``HistoryBoard`` (``serving.history_board``), from which every
Ingress replica learns them: the user's next recommendation reads them without retraining.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Gauge

from serving.feedback_log import SESSION_START_EVENT, FeedbackEvent, FeedbackLog
from serving.history_board import Published
from serving.live_history import is_positive

logger = logging.getLogger("ray.serve")


@serve.deployment(num_replicas=1)
class FeedbackSink:
    """Append-only sink for feedback events.

    Args:
        log_dir: absolute folder of the log (``data/feedback`` unless configured).
        predictor: handle to the precompute ``Predictor`` or None.
        compact_every_s: seconds between background compactions.
        archive: object storage (or a shared folder) the compacted parts are published to.
        history_board: handle to the ``HistoryBoard`` or None (no live histories).
    """

    def __init__(self, log_dir: str, predictor: DeploymentHandle | None = None, compact_every_s: float = 30.0,
                 archive: str | None = None, history_board: DeploymentHandle | None = None) -> None:
        self._log = FeedbackLog(log_dir, archive=archive)
        self._board = history_board
        self._io = asyncio.Lock()  # append and compact both touch the open segment
        self._predictor = predictor
        recovered = self._log.compact()
        if recovered:
            logger.info("FeedbackSink: compacted %d events left by a previous replica", recovered)
        self._events = Counter("rayrec_feedback_events", description="Feedback events acknowledged (durable).")
        self._pending = Gauge("rayrec_feedback_pending_segments", description="WAL segments not yet in Parquet.")
        self._compact_every_s = compact_every_s
        self._compactor = asyncio.get_event_loop().create_task(self._compact_forever())

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def append(self, batches: list[list[FeedbackEvent]]) -> list[int]:
        """Durably append each request's events; returns each request's count (group commit)."""
        now_ms = int(time.time() * 1e3)
        stamped = [[replace(e, received_ms=now_ms) for e in events] for events in batches]
        async with self._io:
            await asyncio.to_thread(self._log.append, [e for events in stamped for e in events])
        self._events.inc(sum(len(events) for events in stamped))
        if self._board is not None:  # before the Predictor: it re-retrieves these users' candidates
            engaged = [Published(e.event_id, e.user_id, e.item_id) for events in stamped for e in events if is_positive(e.event)]
            if engaged:
                self._board.publish.remote(engaged)  # fire and forget: the log is the record
        if self._predictor is not None:  # fire and forget
            flat = [e for events in stamped for e in events]
            starts = [e.user_id for e in flat if e.event == SESSION_START_EVENT]
            pairs = [(e.user_id, e.item_id) for e in flat if e.event != SESSION_START_EVENT]
            if starts:
                self._predictor.observe_session_start.remote(starts)
            if pairs:
                self._predictor.observe_feedback.remote(pairs)
        return [len(events) for events in stamped]

    async def compact(self) -> int:
        """Compact now (tests and shutdown); returns events written."""
        async with self._io:
            written = await asyncio.to_thread(self._log.compact)
        self._pending.set(self._log.pending_segments())
        return written

    def info(self) -> dict[str, Any]:
        return {"log_dir": str(self._log.root), "pending_segments": self._log.pending_segments()}

    async def _compact_forever(self) -> None:
        while True:
            await asyncio.sleep(self._compact_every_s)
            try:
                await self.compact()
            except Exception:  # keep the sink up: the segments stay and the next pass retries
                logger.exception("FeedbackSink: compaction failed; will retry")

    def __del__(self) -> None:
        # Graceful shutdown: Serve calls __del__ once in-flight requests have drained.
        self._compactor.cancel()
        self._log.close()
