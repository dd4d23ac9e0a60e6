"""Worker endpoints (register, heartbeat, list, unregister) and the queue."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask_smorest import Blueprint

from h2k import schemas
from h2k.capabilities import QUEUES, queues_for_worker
from h2k.errors import StateError
from h2k.states import JobState
from web.services import services

blp = Blueprint("fleet", __name__, description="Workers and the job queue")


@blp.route("/workers/register", methods=["POST"])
@blp.arguments(schemas.WorkerRegistrationSchema)
@blp.response(201, schemas.WorkerRegisteredSchema)
def register_worker(registration: dict[str, Any]) -> Any:
    """Register a worker and its capabilities"""
    worker = services().workers.register(registration)
    return {
        "worker_id": worker["worker_id"],
        "message": "Worker registered successfully",
        "capabilities": worker["capabilities"],
        "registered_at": worker["registered_at"],
    }


@blp.route("/workers/<string:worker_id>/heartbeat", methods=["POST"])
@blp.response(200, schemas.HeartbeatResponseSchema)
@blp.alt_response(404, schema=schemas.ErrorEnvelopeSchema)
def heartbeat(worker_id: str) -> Any:
    """Record that a worker is alive"""
    timestamp = services().workers.heartbeat(worker_id)
    return {
        "worker_id": worker_id,
        "message": "Heartbeat received",
        "timestamp": timestamp,
    }


@blp.route("/workers")
@blp.response(200, schemas.WorkerListSchema)
def list_workers() -> Any:
    """Registered workers; active ones heartbeated recently"""
    workers = services().workers.all()
    return {
        "total": len(workers),
        "active": sum(1 for w in workers if w["active"]),
        "workers": workers,
    }


@blp.route("/workers/<string:worker_id>", methods=["DELETE"])
@blp.response(200, schemas.WorkerUnregisteredSchema)
@blp.alt_response(404, schema=schemas.ErrorEnvelopeSchema)
def unregister_worker(worker_id: str) -> Any:
    """Unregister a worker"""
    services().workers.unregister(worker_id)
    return {"worker_id": worker_id, "message": "Worker unregistered successfully"}


@blp.route("/queue")
@blp.response(200, schemas.QueueStatusSchema)
def queue_status() -> Any:
    """Queued jobs by priority and by capability queue"""
    return services().jobs.queue_status(QUEUES)


@blp.route("/queue/dequeue", methods=["POST"])
@blp.arguments(schemas.DequeueRequestSchema)
@blp.response(200, schemas.JobSpecSchema, description="The job, or null")
def dequeue(request: dict[str, Any]) -> Any:
    """Hand a polling worker the best queued job it can run, or null"""
    h2k = services()
    queues = queues_for_worker(request["capabilities"])
    worker_id = request["worker_id"]
    for _ in range(5):
        candidates = h2k.jobs.queued_heads(queues)
        if not candidates:
            break
        for job_id in candidates:
            try:
                h2k.jobs.transition(
                    job_id,
                    JobState.ASSIGNED,
                    f"Assigned to worker {worker_id} (pull)",
                    fields={"worker_id": worker_id},
                )
            except StateError:
                continue
            return h2k.jobs.get(job_id)["spec"]
    return current_app.response_class("null\n", mimetype="application/json")
