"""Celery settings for h2k, read from the environment (see h2k.config)."""

from kombu import Queue

from h2k.capabilities import QUEUES
from h2k.config import Settings
from h2k.priority import LEVELS

_settings = Settings.from_env()

broker_url = _settings.broker_url
result_backend = _settings.result_backend
broker_connection_retry_on_startup = True

# One queue per capability. x-max-priority gives RabbitMQ its levels; the
# Redis transport uses priority_steps below.
task_queues = [
    Queue(name, routing_key=name, queue_arguments={"x-max-priority": LEVELS - 1})
    for name in QUEUES
]
task_default_queue = QUEUES[0]
task_create_missing_queues = False

broker_transport_options = {
    "priority_steps": list(range(LEVELS)),
    # Queues are consumed in the order a worker lists them; h2k lists the
    # most privileged first, so a privileged worker serves the work only it
    # can do before the work any worker can do.
    "queue_order_strategy": "priority",
    # Migrations run for hours; lost workers are found by their heartbeats,
    # not by Redis redelivering a message.
    "visibility_timeout": 7 * 24 * 3600,
}

# Take one job at a time and only when free, so that a busy worker does not
# hold a low-priority job that a later high-priority one should overtake.
worker_prefetch_multiplier = 1
worker_disable_prefetch = True

task_serializer = "json"
accept_content = ["json"]
result_serializer = "json"
# The job store holds every result; the backend only serves Flower and
# AsyncResult look-ups, briefly.
result_expires = 24 * 3600
task_track_started = True

# Task events, so Flower shows each task under its job id.
worker_send_task_events = True
task_send_sent_event = True

worker_hijack_root_logger = False
worker_redirect_stdouts = False
