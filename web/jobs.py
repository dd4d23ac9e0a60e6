"""Job endpoints: submit, look up, list, cancel, queue, events."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from flask_smorest import Blueprint

from h2k import schemas
from h2k.states import JobState
from h2k.submission import check_paths
from h2k.tools import qemu_img
from web.services import services
from web.stream import sse

blp = Blueprint("jobs", __name__, description="Submit and follow migration jobs")


def _submitted(submission: Any) -> tuple[dict[str, Any], int]:
    body = {
        "job_id": submission.job["job_id"],
        "state": submission.job["state"],
        "message": submission.message,
        "queue_position": submission.queue_position,
    }
    return body, 201 if submission.created else 200


@blp.route("/jobs")
class Jobs(MethodView):
    @blp.arguments(schemas.SubmitQuerySchema, location="query")
    @blp.arguments(schemas.JobSpecSchema)
    @blp.response(201, schemas.JobSubmitResponseSchema)
    @blp.alt_response(
        200,
        schema=schemas.JobSubmitResponseSchema,
        description="The same job was submitted before",
    )
    @blp.alt_response(
        409,
        schema=schemas.ErrorEnvelopeSchema,
        description="The job id exists with a different spec",
    )
    @blp.alt_response(
        503,
        schema=schemas.ErrorEnvelopeSchema,
        description="Redis or the broker is unreachable",
    )
    def post(self, query: dict[str, Any], spec: dict[str, Any]) -> Any:
        """Submit a migration job"""
        h2k = services()
        settings = h2k.settings
        check_paths(
            spec,
            settings.allowed_roots,
            qemu_img.verify_declared_format if settings.format_check else None,
        )
        return _submitted(h2k.submissions.submit(spec, queue_now=query["queue"]))

    @blp.arguments(schemas.JobListQuerySchema, location="query")
    @blp.response(200, schemas.JobListSchema)
    def get(self, query: dict[str, Any]) -> Any:
        """List jobs, newest first"""
        state = JobState(query["state"]) if "state" in query else None
        total, jobs, cursor = services().jobs.list_jobs(
            state, query["limit"], query.get("cursor")
        )
        return {
            "total": total,
            "jobs": jobs,
            "next_cursor": None if cursor is None else str(cursor),
        }


@blp.route("/jobs/<string:job_id>")
class Job(MethodView):
    @blp.response(200, schemas.JobStatusSchema)
    @blp.alt_response(404, schema=schemas.ErrorEnvelopeSchema)
    def get(self, job_id: str) -> Any:
        """A job: its spec, full history, result and latest event"""
        h2k = services()
        job = h2k.jobs.get(job_id)
        return {
            **job,
            "state_history": h2k.jobs.history(job_id),
        }

    @blp.response(200, schemas.CancelResponseSchema)
    @blp.alt_response(
        400,
        schema=schemas.ErrorEnvelopeSchema,
        description="The job has already finished",
    )
    @blp.alt_response(404, schema=schemas.ErrorEnvelopeSchema)
    def delete(self, job_id: str) -> Any:
        """Cancel a queued or running job"""
        services().submissions.cancel(job_id)
        return {
            "job_id": job_id,
            "state": JobState.CANCELLED,
            "message": "Job cancelled successfully",
        }


@blp.route("/jobs/<string:job_id>/queue", methods=["POST"])
@blp.response(200, schemas.JobSubmitResponseSchema)
@blp.alt_response(400, schema=schemas.ErrorEnvelopeSchema)
def queue_job(job_id: str) -> Any:
    """Queue a job stored with ?queue=false"""
    body, _ = _submitted(services().submissions.queue(job_id))
    return body


@blp.route("/jobs/<string:job_id>/events")
@blp.arguments(schemas.EventsQuerySchema, location="query")
@blp.response(200, schemas.ProgressEventSchema(many=True))
@blp.alt_response(404, schema=schemas.ErrorEnvelopeSchema)
def job_events(query: dict[str, Any], job_id: str) -> Any:
    """Progress events of a job, oldest first (polling)"""
    h2k = services()
    h2k.jobs.state(job_id)
    return h2k.events.progress_since(job_id, query.get("since"))


@blp.route("/jobs/<string:job_id>/events/stream")
@blp.arguments(schemas.StreamQuerySchema, location="query")
@blp.doc(
    responses={
        "200": {
            "description": "Server-Sent Events: progress, state, complete, error",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    }
)
def job_event_stream(query: dict[str, Any], job_id: str) -> Any:
    """Stream a job's events live (Server-Sent Events)"""
    return sse.job_stream(job_id)
