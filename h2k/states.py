"""Job states and the one table of allowed transitions.

Every state change in h2k is checked against :data:`TRANSITIONS`; the store
applies it atomically in Redis (see :mod:`h2k.store`), so two racing updates
cannot both win and a terminal state never changes again.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    CREATED = "CREATED"
    VALIDATED = "VALIDATED"
    QUEUED = "QUEUED"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


S = JobState

TERMINAL: frozenset[JobState] = frozenset({S.COMPLETED, S.FAILED, S.CANCELLED})

# States in which a worker holds the job.
ACTIVE: frozenset[JobState] = frozenset({S.ASSIGNED, S.RUNNING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.CREATED: frozenset({S.VALIDATED, S.FAILED, S.CANCELLED}),
    # VALIDATED is also where a job goes back when the broker refused it.
    S.VALIDATED: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    S.QUEUED: frozenset({S.ASSIGNED, S.VALIDATED, S.FAILED, S.CANCELLED}),
    # ASSIGNED -> QUEUED: the worker gave the job back before starting it.
    S.ASSIGNED: frozenset({S.RUNNING, S.QUEUED, S.FAILED, S.CANCELLED}),
    # RUNNING -> QUEUED: a lost worker's idempotent job is queued again.
    S.RUNNING: frozenset({S.COMPLETED, S.FAILED, S.RETRYING, S.CANCELLED, S.QUEUED}),
    S.RETRYING: frozenset({S.ASSIGNED, S.QUEUED, S.FAILED, S.CANCELLED}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def can_transition(current: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[current]


def is_terminal(state: JobState | str) -> bool:
    return JobState(state) in TERMINAL
