"""What the views use, built once per app and kept on ``app.extensions``."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import Flask, current_app

from h2k.config import Settings
from h2k.store import EventLog, JobStore, WorkerRegistry, connect
from h2k.submission import JobService
from web.broker import Broker
from web.hub import EventHub


@dataclass
class Services:
    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    events: EventLog
    workers: WorkerRegistry
    broker: Broker
    submissions: JobService
    hub: EventHub

    def close(self) -> None:
        """Close every connection these services hold (tests, shutdown)."""
        self.hub.close()
        self.redis.close()
        self.broker.celery.close()


def build(app: Flask, settings: Settings) -> Services:
    # The API's own Celery client, configured as the workers are; it only
    # sends tasks by name.
    celery_app = Celery("h2k", set_as_current=False)
    celery_app.config_from_object("celeryconfig")
    celery_app.conf.broker_url = settings.broker_url
    celery_app.conf.result_backend = settings.result_backend
    client = connect(settings.redis_url)
    jobs = JobStore(client, settings.events_maxlen)
    broker = Broker(celery_app, settings.broker_url)
    built = Services(
        settings=settings,
        redis=client,
        jobs=jobs,
        events=EventLog(client),
        workers=WorkerRegistry(client, settings.worker_stale_seconds),
        broker=broker,
        submissions=JobService(jobs, broker.publish, broker.revoke),
        hub=EventHub(settings.redis_url),
    )
    app.extensions["h2k"] = built
    return built


def services() -> Services:
    built: Services = current_app.extensions["h2k"]
    return built
