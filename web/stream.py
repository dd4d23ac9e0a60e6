"""``GET /jobs/{id}/events/stream``: replay, then live events, then complete.

The client is subscribed to the process's hub before the stream is read, so
an event published while the replay runs is not lost; an event seen in both
is sent once, because every event carries its stream id and only ids after
the last one sent go out. Messages are rendered by flask-sse.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime

from flask import Response, current_app, request, stream_with_context
from flask_sse import Message, ServerSentEventsBlueprint

from h2k.errors import H2KError, InvalidInput, Unavailable
from h2k.states import TERMINAL, JobState
from h2k.store.events import StoredEvent, is_stream_id, stream_id_key
from web.hub import RESYNC
from web.services import services

KEEPALIVE_SECONDS = 15.0
# How long a stream waits for an unreachable Redis before it gives up.
REDIS_PATIENCE = 60.0
MAX_STREAM_ID_SEQ = 2**64 - 1


def resume_point(value: str | None) -> str | None:
    """A stream id to resume after, from Last-Event-ID or ``since``."""
    if not value:
        return None
    if is_stream_id(value):
        return value
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidInput(
            "since must be an event id or an ISO 8601 timestamp",
            {"since": ["Not an event id or an ISO 8601 timestamp."]},
        ) from exc
    if moment.tzinfo is None:
        raise InvalidInput(
            "since must carry a time zone", {"since": ["Missing time zone."]}
        )
    return f"{int(moment.timestamp() * 1000)}-{MAX_STREAM_ID_SEQ}"


def _render(event: StoredEvent) -> str:
    return str(Message(event.data, type=event.type, id=event.id))


def _complete(state: str) -> str:
    return str(Message({"state": state}, type="complete"))


def _error(message: str) -> str:
    return str(Message({"message": message}, type="error"))


class JobEventsBlueprint(ServerSentEventsBlueprint):
    """flask-sse's blueprint, fed by the process-wide hub and the job stream."""

    def job_stream(self, job_id: str) -> Response:
        h2k = services()
        h2k.jobs.state(job_id)  # 404 before the stream opens
        last_id = resume_point(
            request.headers.get("Last-Event-ID") or request.args.get("since")
        )
        keepalive = current_app.config.get(
            "H2K_SSE_KEEPALIVE_SECONDS", KEEPALIVE_SECONDS
        )
        subscription = h2k.hub.subscribe(job_id)

        def stored_after() -> tuple[list[StoredEvent], str | None]:
            """Events after ``last_id``, and the state if the job has ended."""
            stored = h2k.events.after(job_id, last_id)
            if any(_terminal(event) for event in stored):
                return stored, None
            state = h2k.jobs.state(job_id)
            # A terminal event trimmed from the capped stream still ends it.
            return stored, state if state in TERMINAL else None

        def events() -> Iterator[str]:
            nonlocal last_id
            behind = True
            unreachable_since: float | None = None
            try:
                yield "retry: 3000\n\n"
                while True:
                    if behind:
                        try:
                            stored, ended = stored_after()
                        except Unavailable as exc:
                            # Redis restarting: hold the client for a while.
                            unreachable_since = unreachable_since or time.monotonic()
                            if time.monotonic() - unreachable_since > REDIS_PATIENCE:
                                yield _error(str(exc))
                                return
                            yield ": waiting for Redis\n\n"
                            time.sleep(min(keepalive, 1.0))
                            continue
                        unreachable_since = None
                        for event in stored:
                            last_id = event.id
                            yield _render(event)
                            if _terminal(event):
                                yield _complete(event.data["state"])
                                return
                        if ended is not None:
                            yield _complete(ended)
                            return
                        behind = False
                    message = subscription.get(timeout=keepalive)
                    if message is None or message is RESYNC:
                        # Quiet or reconnected: look at the stream itself.
                        if message is None:
                            yield ": keep-alive\n\n"
                        behind = True
                        continue
                    if last_id and stream_id_key(message.id) <= stream_id_key(last_id):
                        continue
                    event = StoredEvent(message.id, message.type, message.data)
                    last_id = event.id
                    yield _render(event)
                    if _terminal(event):
                        yield _complete(event.data["state"])
                        return
            except H2KError as exc:
                yield _error(str(exc))
            finally:
                subscription.close()

        response = current_app.response_class(
            stream_with_context(events()), mimetype="text/event-stream"
        )
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        return response


def _terminal(event: StoredEvent) -> bool:
    return event.type == "state" and JobState(event.data["state"]) in TERMINAL


sse = JobEventsBlueprint("sse", __name__)
