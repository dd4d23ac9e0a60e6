"""Redis is the single source of truth: jobs, events, workers, counters."""

from h2k.store.connection import connect, redis_errors
from h2k.store.events import EventLog
from h2k.store.jobs import JobStore
from h2k.store.workers import WorkerRegistry

__all__ = ["EventLog", "JobStore", "WorkerRegistry", "connect", "redis_errors"]
