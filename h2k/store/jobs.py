"""Jobs in Redis: the spec, the state, the history, the indexes.

Keys (all under the ``h2k:`` prefix):

- ``job:{id}``: hash of the job (spec, state, worker, result, error, ...)
- ``job:{id}:history``: list of ``{state, timestamp, reason}``
- ``job:{id}:events``: capped stream of state and progress events
- ``jobs``: sorted set of every job id by submission order
- ``jobs:state:{STATE}``: one sorted set per state, same order
- ``queued:{queue}``: the queued jobs of one queue, best first
- ``queued:by_priority``: hash of priority to number of queued jobs

Every state change runs ``lua/transition.lua``: the check against the
transition table, the history entry, the indexes, the metrics of a terminal
state, and the state event are one atomic step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis

from h2k.errors import NotFound, StateError
from h2k.states import TERMINAL, TRANSITIONS, JobState
from h2k.store.connection import PREFIX, load_script, redis_errors

DURATION_BUCKETS: tuple[float, ...] = (
    30,
    60,
    300,
    600,
    1800,
    3600,
    7200,
    14400,
    28800,
    86400,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Transition:
    previous: JobState
    state: JobState
    event_id: str


@dataclass(frozen=True)
class Created:
    job: dict[str, Any]
    created: bool


def _allowed_from(target: JobState) -> str:
    return ",".join(s for s, targets in TRANSITIONS.items() if target in targets)


def _field_value(value: Any) -> str | None:
    """How a job field is stored: strings as they are, the rest as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _decode_job(raw: dict[str, str]) -> dict[str, Any]:
    job: dict[str, Any] = dict(raw)
    for key in ("spec", "result", "error", "latest_event"):
        job[key] = json.loads(raw[key]) if raw.get(key) else None
    job["priority"] = int(raw["priority"])
    job["seq"] = int(raw["seq"])
    job["attempt"] = int(raw.get("attempt", 0))
    return job


class JobStore:
    """Jobs, their history and their indexes, on one Redis."""

    def __init__(self, client: redis.Redis, events_maxlen: int = 10000):
        self.redis = client
        self.events_maxlen = events_maxlen
        self._create = load_script(client, "create")
        self._transition = load_script(client, "transition")
        self._event = load_script(client, "event")

    def _key(self, job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    def create(
        self,
        spec: dict[str, Any],
        queue: str,
        reasons: tuple[str, str] = (
            "Job submitted via REST API",
            "Job spec validated successfully",
        ),
    ) -> Created:
        """Store a validated job, or return the one stored under its id.

        A job that exists comes back with ``created`` false; the caller
        compares specs and decides between "the same job" and a conflict.
        """
        now = isoformat(utcnow())
        history = [
            {"state": JobState.CREATED, "timestamp": now, "reason": reasons[0]},
            {"state": JobState.VALIDATED, "timestamp": now, "reason": reasons[1]},
        ]
        with redis_errors():
            reply = self._create(
                args=[
                    PREFIX,
                    spec["job_id"],
                    canonical_json(spec),
                    spec["operation"],
                    spec["execution_policy"]["priority"],
                    queue,
                    now,
                    json.dumps(history),
                    self.events_maxlen,
                ]
            )
        return Created(self.get(spec["job_id"]), reply[0] == "CREATED")

    def get(self, job_id: str) -> dict[str, Any]:
        with redis_errors():
            raw = cast(dict[str, str], self.redis.hgetall(self._key(job_id)))
        if not raw:
            raise NotFound(f"Job {job_id} not found")
        return _decode_job(raw)

    def state(self, job_id: str) -> JobState:
        with redis_errors():
            value = cast(str | None, self.redis.hget(self._key(job_id), "state"))
        if value is None:
            raise NotFound(f"Job {job_id} not found")
        return JobState(value)

    def history(self, job_id: str) -> list[dict[str, Any]]:
        with redis_errors():
            entries = self.redis.lrange(f"{self._key(job_id)}:history", 0, -1)
        return [json.loads(entry) for entry in entries]

    def transition(
        self,
        job_id: str,
        target: JobState,
        reason: str,
        *,
        fields: dict[str, Any] | None = None,
        expect_worker: str | None = None,
    ) -> Transition:
        """Move a job to ``target`` if the table allows it from where it is.

        ``fields`` are set on the job in the same step (dicts and lists are
        stored as JSON, ``None`` removes the field). With ``expect_worker``
        the change applies only while that worker holds the job. Raises
        :class:`StateError` when refused, :class:`NotFound` for no such job.
        """
        now = utcnow()
        encoded = {key: _field_value(value) for key, value in (fields or {}).items()}
        entry = {"state": target, "timestamp": isoformat(now), "reason": reason}
        with redis_errors():
            reply = self._transition(
                args=[
                    PREFIX,
                    job_id,
                    target.value,
                    _allowed_from(target),
                    json.dumps(entry),
                    isoformat(now),
                    now.timestamp(),
                    json.dumps(encoded),
                    expect_worker or "",
                    "1" if target in TERMINAL else "0",
                    self.events_maxlen,
                    reason,
                    ",".join(str(b) for b in DURATION_BUCKETS),
                ]
            )
        if reply[0] == "NOT_FOUND":
            raise NotFound(f"Job {job_id} not found")
        if reply[0] == "REFUSED":
            current = JobState(reply[1])
            if current in TERMINAL:
                message = f"Job {job_id} is already in terminal state {current}"
            else:
                message = f"Job {job_id} is {current}; it cannot become {target}"
            raise StateError(message)
        return Transition(JobState(reply[1]), target, reply[2])

    def record_event(self, job_id: str, event: dict[str, Any]) -> str | None:
        """Append a progress event; None when the job is gone or finished."""
        with redis_errors():
            event_id: str | None = self._event(
                args=[PREFIX, job_id, json.dumps(event), self.events_maxlen]
            )
        return event_id or None

    def list_jobs(
        self, state: JobState | None = None, limit: int = 100, cursor: int | None = None
    ) -> tuple[int, list[dict[str, Any]], int | None]:
        """Newest first, from the index; returns (total, jobs, next cursor)."""
        index = f"{PREFIX}jobs" if state is None else f"{PREFIX}jobs:state:{state}"
        upper = "+inf" if cursor is None else f"({cursor}"
        with redis_errors():
            total = self.redis.zcard(index)
            ids = cast(
                list[tuple[str, float]],
                self.redis.zrevrangebyscore(
                    index, upper, "-inf", start=0, num=limit + 1, withscores=True
                ),
            )
            page = ids[:limit]
            pipe = self.redis.pipeline(transaction=False)
            for job_id, _ in page:
                pipe.hmget(
                    self._key(job_id), "state", "created_at", "operation", "priority"
                )
            rows = pipe.execute()
        jobs = [
            {
                "job_id": job_id,
                "state": row[0],
                "created_at": row[1],
                "is_terminal": JobState(row[0]) in TERMINAL,
                "operation": row[2],
                "priority": int(row[3]),
            }
            for (job_id, _), row in zip(page, rows, strict=True)
            if row[0] is not None
        ]
        next_cursor = int(page[-1][1]) if len(ids) > limit else None
        return total, jobs, next_cursor

    def queue_position(self, job_id: str, queue: str) -> int | None:
        """1 for the next job a worker of ``queue`` takes; None if not queued."""
        with redis_errors():
            rank = cast(int | None, self.redis.zrank(f"{PREFIX}queued:{queue}", job_id))
        return None if rank is None else rank + 1

    def queued_heads(self, queues: list[str], count: int = 10) -> list[str]:
        """The best queued jobs across ``queues``, best first."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for queue in queues:
                pipe.zrange(f"{PREFIX}queued:{queue}", 0, count - 1, withscores=True)
            rows = pipe.execute()
        candidates = sorted((score, job_id) for row in rows for job_id, score in row)
        return [job_id for _, job_id in candidates[:count]]

    def queue_status(self, queues: tuple[str, ...]) -> dict[str, Any]:
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(f"{PREFIX}queued:by_priority")
            for queue in queues:
                pipe.zcard(f"{PREFIX}queued:{queue}")
            by_priority, *sizes = pipe.execute()
        counts = {
            key: int(value)
            for key, value in sorted(by_priority.items(), key=lambda kv: int(kv[0]))
            if int(value) > 0
        }
        return {
            "total_jobs": sum(sizes),
            "by_priority": counts,
            "by_queue": dict(zip(queues, sizes, strict=True)),
        }

    def count_in_states(self, states: frozenset[JobState]) -> int:
        with redis_errors():
            pipe = self.redis.pipeline(transaction=False)
            for state in states:
                pipe.zcard(f"{PREFIX}jobs:state:{state}")
            return sum(pipe.execute())
