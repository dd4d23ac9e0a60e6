"""The progress callback and the cancellation check an operation is given."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from h2k.states import JobState
from h2k.store import JobStore
from h2k.store.jobs import isoformat, utcnow


class EventReporter:
    """Records each progress event in the job's stream, which publishes it."""

    def __init__(self, store: JobStore, job_id: str):
        self.store = store
        self.job_id = job_id
        self.phase = "initialization"

    def __call__(
        self,
        phase: str,
        percentage: int | None,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.phase = phase
        event = {
            "job_id": self.job_id,
            "timestamp": isoformat(utcnow()),
            "phase": phase,
            "percentage": percentage,
            "message": message,
            "details": dict(details or {}),
        }
        self.store.record_event(self.job_id, event)


class CancelWatch:
    """Answers whether the job was cancelled, asking Redis at most once a second."""

    INTERVAL = 1.0

    def __init__(self, store: JobStore, job_id: str):
        self.store = store
        self.job_id = job_id
        self._checked = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._checked >= self.INTERVAL:
            self._checked = now
            self._cancelled = self.store.state(self.job_id) == JobState.CANCELLED
        return self._cancelled
