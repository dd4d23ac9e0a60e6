"""Sending jobs to Celery by task name, and revoking them."""

from __future__ import annotations

from typing import Any

import kombu.exceptions
import redis
from celery import Celery

from h2k.errors import Unavailable
from h2k.priority import broker_priority
from workers.app import RUN_JOB, RUN_JOB_ONCE

# The operation enforces timeout_seconds itself and reports the phase it was
# in; Celery's soft limit is the backstop a little later, and the hard limit
# (which kills the process) later still, after time to clean up.
SOFT_LIMIT_GRACE = 30
HARD_LIMIT_GRACE = 90
BROKER_ERRORS = (kombu.exceptions.OperationalError, redis.RedisError, OSError)


class Broker:
    def __init__(self, celery: Celery, broker_url: str):
        self.celery = celery
        self.broker_url = broker_url

    def publish(self, job_id: str, spec: dict[str, Any], queue: str) -> None:
        policy = spec["execution_policy"]
        task = RUN_JOB if policy["idempotent"] else RUN_JOB_ONCE
        try:
            self.celery.send_task(
                task,
                args=[job_id],
                task_id=job_id,
                queue=queue,
                routing_key=queue,
                priority=broker_priority(policy["priority"], self.broker_url),
                soft_time_limit=policy["timeout_seconds"] + SOFT_LIMIT_GRACE,
                time_limit=policy["timeout_seconds"] + HARD_LIMIT_GRACE,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2},
            )
        except BROKER_ERRORS as exc:
            raise Unavailable(f"The broker is unreachable: {exc}") from exc

    def revoke(self, job_id: str) -> None:
        try:
            self.celery.control.revoke(job_id)
        except BROKER_ERRORS as exc:
            raise Unavailable(f"The broker is unreachable: {exc}") from exc
