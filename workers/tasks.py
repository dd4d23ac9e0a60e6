"""The one task that runs a job, in two delivery policies.

``h2k.run_job`` is for idempotent jobs: acknowledged late, so a message
whose worker died is delivered again. ``h2k.run_job_once`` is for the rest:
acknowledged when it starts, so it is never started twice. Both run the same
body; the state machine (driven by :mod:`workers.signals`) decides whether
this delivery may run at all.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Task
from celery.exceptions import Ignore

from h2k import operations
from h2k.errors import OperationError
from h2k.operations.base import OperationContext
from workers.app import RUN_JOB, RUN_JOB_ONCE, app
from workers.reporting import CancelWatch, EventReporter
from workers.runtime import job_store, settings

log = logging.getLogger(__name__)


def _retry_backoff() -> tuple[int, ...]:
    """Seconds before each retry; ``H2K_RETRY_BACKOFF`` as "30,120,600"."""
    value = os.environ.get("H2K_RETRY_BACKOFF", "30,120,600")
    return tuple(int(part) for part in value.split(",") if part.strip())


RETRY_BACKOFF = _retry_backoff()


class JobTask(Task):
    """Task policy in one place: which errors retry, and how soon."""

    typing = False

    def run_job(self, job_id: str) -> dict[str, Any] | None:
        if not getattr(self.request, "h2k_claimed", False):
            log.info("job %s: not runnable by this delivery, skipped", job_id)
            raise Ignore()
        store = job_store()
        job = store.get(job_id)
        spec = job["spec"]
        report = EventReporter(store, job_id)
        self.request.h2k_reporter = report
        report("initialization", 0, "Starting job execution")
        context = OperationContext(
            job_id=job_id,
            spec=spec,
            report=report,
            should_stop=CancelWatch(store, job_id),
            allowed_roots=settings().allowed_roots,
        )
        try:
            return operations.get(spec["operation"])(context)
        except OperationError as exc:
            policy = spec["execution_policy"]
            retries = self.request.retries
            if (
                exc.retryable
                and policy["idempotent"]
                and retries < policy["retry_count"]
            ):
                countdown = RETRY_BACKOFF[min(retries, len(RETRY_BACKOFF) - 1)]
                raise self.retry(
                    exc=exc, countdown=countdown, max_retries=policy["retry_count"]
                ) from exc
            raise


@app.task(
    bind=True,
    base=JobTask,
    name=RUN_JOB,
    acks_late=True,
    reject_on_worker_lost=True,
)
def run_job(self: JobTask, job_id: str) -> dict[str, Any] | None:
    return self.run_job(job_id)


@app.task(bind=True, base=JobTask, name=RUN_JOB_ONCE, acks_late=False)
def run_job_once(self: JobTask, job_id: str) -> dict[str, Any] | None:
    return self.run_job(job_id)
