"""Per-process access to settings and the stores.

Prefork children must not share the parent's Redis sockets, so each process
makes its own connection on first use.
"""

from __future__ import annotations

import os
from functools import cache

from h2k.config import Settings
from h2k.store import JobStore, WorkerRegistry, connect


@cache
def settings() -> Settings:
    return Settings.from_env()


_stores: dict[int, tuple[JobStore, WorkerRegistry]] = {}


def _stores_for_pid() -> tuple[JobStore, WorkerRegistry]:
    pid = os.getpid()
    if pid not in _stores:
        client = connect(settings().redis_url)
        _stores[pid] = (
            JobStore(client, settings().events_maxlen),
            WorkerRegistry(client, settings().worker_stale_seconds),
        )
    return _stores[pid]


def job_store() -> JobStore:
    return _stores_for_pid()[0]


def worker_registry() -> WorkerRegistry:
    return _stores_for_pid()[1]
