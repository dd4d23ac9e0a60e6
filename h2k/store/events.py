"""Reading a job's event stream: state changes and progress, in order.

Each entry of ``job:{id}:events`` has a ``type`` (``state`` or ``progress``)
and ``data`` (the event as JSON). The stream id is the event's identity: the
SSE ``id:`` a client resumes from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import redis

from h2k.store.connection import PREFIX, redis_errors

# Events are stamped by the workers' clocks, stream ids by Redis's; read a
# little before ``since`` so that a skewed clock loses nothing.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class StoredEvent:
    id: str
    type: str
    data: dict[str, Any]


def channel(job_id: str) -> str:
    """The pub/sub channel live events of a job are published on."""
    return f"{PREFIX}sse:job:{job_id}"


def channel_pattern() -> str:
    return f"{PREFIX}sse:job:*"


def job_id_of_channel(name: str) -> str:
    return name[len(f"{PREFIX}sse:job:") :]


def stream_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def is_stream_id(value: str) -> bool:
    ms, sep, seq = value.partition("-")
    return ms.isdigit() and (not sep or seq.isdigit())


def stream_id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    # decode_responses: every id, field and value is a str.
    return cast(list[tuple[str, dict[str, str]]], reply or [])


class EventLog:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def after(self, job_id: str, event_id: str | None = None) -> list[StoredEvent]:
        """Every event after ``event_id`` (all of them when None)."""
        start = "-" if event_id is None else f"({event_id}"
        with redis_errors():
            rows = _entries(self.redis.xrange(stream_key(job_id), min=start, max="+"))
        return [
            StoredEvent(entry_id, fields["type"], json.loads(fields["data"]))
            for entry_id, fields in rows
        ]

    def progress_since(
        self, job_id: str, since: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Progress events stamped later than ``since``, oldest first."""
        start = "-"
        if since is not None:
            start = str(int((since - CLOCK_SKEW).timestamp() * 1000))
        with redis_errors():
            rows = _entries(self.redis.xrange(stream_key(job_id), min=start, max="+"))
        events = [
            json.loads(fields["data"])
            for _, fields in rows
            if fields["type"] == "progress"
        ]
        if since is None:
            return events
        return [e for e in events if datetime.fromisoformat(e["timestamp"]) > since]
