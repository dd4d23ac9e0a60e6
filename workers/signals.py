"""Celery signals drive the job state machine.

``task_prerun`` claims the job (ASSIGNED to this worker, then RUNNING); the
claim is a check-and-set, so a cancelled job, or one another delivery already
runs, is not run again. The outcome signals record COMPLETED, FAILED,
RETRYING or CANCELLED. Each change goes through the store's transition table;
one that the table refuses (the job was cancelled meanwhile) is logged and
dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    task_revoked,
    task_success,
)

from h2k.errors import NotFound, OperationError, StateError
from h2k.operations.codes import CANCELLED, TIMEOUT
from h2k.states import JobState
from workers.app import RUN_JOB, RUN_JOB_ONCE
from workers.runtime import job_store

log = logging.getLogger(__name__)

JOB_TASKS = frozenset({RUN_JOB, RUN_JOB_ONCE})


def _job_id(args: Any, kwargs: Any) -> str | None:
    if args:
        return str(args[0])
    if kwargs and "job_id" in kwargs:
        return str(kwargs["job_id"])
    return None


def _move(job_id: str, target: JobState, reason: str, **fields: Any) -> bool:
    try:
        job_store().transition(job_id, target, reason, fields=fields or None)
    except (StateError, NotFound) as exc:
        log.info("job %s: not moved to %s: %s", job_id, target, exc)
        return False
    return True


@task_prerun.connect
def claim_job(task: Any = None, args: Any = None, kwargs: Any = None, **_: Any) -> None:
    if task is None or task.name not in JOB_TASKS:
        return
    job_id = _job_id(args, kwargs)
    task.request.h2k_claimed = False
    if job_id is None:
        return
    worker = task.request.hostname or "unknown"
    store = job_store()
    try:
        attempt = store.get(job_id)["attempt"] + 1
    except NotFound:
        log.warning("job %s: no such job; message dropped", job_id)
        return
    if not _move(
        job_id,
        JobState.ASSIGNED,
        f"Assigned to worker {worker}",
        worker_id=worker,
        attempt=str(attempt),
    ):
        return
    if _move(job_id, JobState.RUNNING, "Worker started execution"):
        task.request.h2k_claimed = True


@task_success.connect
def record_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if sender is None or sender.name not in JOB_TASKS:
        return
    job_id = _job_id(sender.request.args, sender.request.kwargs)
    if job_id and getattr(sender.request, "h2k_claimed", False):
        _move(job_id, JobState.COMPLETED, "Job completed successfully", result=result)


def _error_of(exception: BaseException | None, phase: str) -> dict[str, Any]:
    if isinstance(exception, OperationError):
        return exception.as_dict()
    if isinstance(exception, SoftTimeLimitExceeded | TimeLimitExceeded):
        return {
            "phase": phase,
            "code": TIMEOUT,
            "message": "The job ran past execution_policy.timeout_seconds",
        }
    return {
        "phase": phase,
        "code": "INTERNAL_ERROR",
        "message": f"{type(exception).__name__}: {exception}",
    }


@task_failure.connect
def record_failure(
    sender: Any = None,
    task_id: str | None = None,
    exception: BaseException | None = None,
    args: Any = None,
    kwargs: Any = None,
    **_: Any,
) -> None:
    if sender is None or sender.name not in JOB_TASKS:
        return
    job_id = _job_id(args, kwargs) or task_id
    if job_id is None:
        return
    reporter = getattr(sender.request, "h2k_reporter", None)
    phase = reporter.phase if reporter is not None else "initialization"
    error = _error_of(exception, phase)
    if error["code"] == CANCELLED:
        # The cancel already moved the job; nothing more to record.
        return
    if isinstance(exception, OperationError):
        log.warning("job %s failed: %s", job_id, error["message"])
    _move(job_id, JobState.FAILED, f"{error['code']}: {error['message']}", error=error)


@task_retry.connect
def record_retry(request: Any = None, reason: Any = None, **_: Any) -> None:
    if request is None or request.task not in JOB_TASKS:
        return
    job_id = _job_id(request.args, request.kwargs)
    if job_id:
        _move(job_id, JobState.RETRYING, f"Retrying after: {reason}")


@task_revoked.connect
def record_revoked(request: Any = None, terminated: bool = False, **_: Any) -> None:
    if request is None or request.task not in JOB_TASKS:
        return
    job_id = _job_id(request.args, request.kwargs)
    if job_id:
        _move(job_id, JobState.CANCELLED, "Revoked before it ran")


@task_postrun.connect
def release_claim(task: Any = None, **_: Any) -> None:
    if task is not None and task.name in JOB_TASKS:
        task.request.h2k_claimed = False
