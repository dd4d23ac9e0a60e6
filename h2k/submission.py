"""Taking a job in: validate, check its paths and image, store, queue.

Nothing is stored until every check has passed. Queuing marks the job
QUEUED before the message is published, so a worker that takes it at once
finds it QUEUED; when the broker refuses the message the job goes back to
VALIDATED with the reason, and submitting it again queues it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from marshmallow import ValidationError

from h2k.capabilities import queue_for
from h2k.errors import Conflict, InvalidInput, StateError, Unavailable
from h2k.paths import resolve_inside
from h2k.schemas import JobSpecSchema
from h2k.states import JobState
from h2k.store.jobs import JobStore, canonical_json

log = logging.getLogger(__name__)

# publish(job_id, spec, queue) sends the job to the broker; raises
# Unavailable when the broker cannot take it.
Publisher = Callable[[str, dict[str, Any], str], None]
# revoke(job_id) tells the workers to drop or stop the job.
Revoker = Callable[[str], None]
FormatCheck = Callable[[str, str, tuple[str, ...]], Any]


def flatten_messages(messages: Any, prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested messages as ``{"a.b": [...]}``."""
    if isinstance(messages, dict):
        flat: dict[str, list[str]] = {}
        for key, value in messages.items():
            name = (
                f"{prefix}.{key}"
                if prefix and key != "_schema"
                else (prefix or str(key))
            )
            if key == "_schema" and not prefix:
                name = "body"
            for field, texts in flatten_messages(value, name).items():
                flat.setdefault(field, []).extend(texts)
        return flat
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        return {prefix or "body": list(messages)}
    if isinstance(messages, list):
        flat = {}
        for item in messages:
            for field, texts in flatten_messages(item, prefix).items():
                flat.setdefault(field, []).extend(texts)
        return flat
    return {prefix or "body": [str(messages)]}


def describe_fields(fields: dict[str, list[str]]) -> str:
    return "; ".join(f"{name}: {' '.join(texts)}" for name, texts in fields.items())


def load_spec(payload: Any) -> dict[str, Any]:
    """Validate a JobSpec body; :class:`InvalidInput` names each bad field."""
    if not isinstance(payload, dict):
        raise InvalidInput(
            "The body must be a JSON object (a JobSpec)",
            {"body": ["Must be a JSON object."]},
        )
    try:
        spec: dict[str, Any] = JobSpecSchema().load(payload)
    except ValidationError as exc:
        fields = flatten_messages(exc.messages)
        raise InvalidInput(
            f"Invalid job spec: {describe_fields(fields)}", fields
        ) from exc
    return spec


def check_paths(
    spec: dict[str, Any],
    roots: tuple[str, ...],
    format_check: FormatCheck | None = None,
) -> None:
    """Paths inside the roots, the image there, its format as declared."""
    image = spec["image"]
    real = resolve_inside(image["path"], roots, "image.path")
    if not os.path.exists(real):
        raise InvalidInput(
            f"Image {image['path']} does not exist",
            {"image.path": [f"No such file: {image['path']}"]},
        )
    if not os.path.isfile(real):
        raise InvalidInput(
            f"Image {image['path']} is not a regular file",
            {"image.path": ["Must be a regular file."]},
        )
    output_path = spec["parameters"].get("output_path")
    if output_path:
        out_real = resolve_inside(output_path, roots, "parameters.output_path")
        if not os.path.isdir(os.path.dirname(out_real)):
            raise InvalidInput(
                f"The directory of {output_path} does not exist",
                {"parameters.output_path": ["Its directory does not exist."]},
            )
        if out_real == real:
            raise InvalidInput(
                "The output would overwrite the input image",
                {"parameters.output_path": ["Must differ from image.path."]},
            )
    if format_check is not None:
        format_check(real, image["format"], roots)


@dataclass(frozen=True)
class Submission:
    job: dict[str, Any]
    created: bool
    message: str
    queue_position: int | None


class JobService:
    """Submission, queuing and cancellation, over the store and a broker."""

    def __init__(self, store: JobStore, publish: Publisher, revoke: Revoker):
        self.store = store
        self.publish = publish
        self.revoke = revoke

    def submit(self, spec: dict[str, Any], queue_now: bool = True) -> Submission:
        queue = queue_for(spec["operation"], spec["capability_requirements"])
        outcome = self.store.create(spec, queue)
        job = outcome.job
        if not outcome.created:
            if canonical_json(job["spec"]) != canonical_json(spec):
                raise Conflict(
                    f"Job {spec['job_id']} exists with a different spec; "
                    "choose another job_id"
                )
            if queue_now and job["state"] == JobState.VALIDATED:
                return replace(self.queue(job["job_id"]), created=False)
            return Submission(
                job,
                False,
                f"Job already exists ({job['state']})",
                self.store.queue_position(job["job_id"], job["queue"]),
            )
        log.info("job %s stored for queue %s", job["job_id"], queue)
        if not queue_now:
            return Submission(job, True, "Job stored; not queued", None)
        return self.queue(job["job_id"])

    def queue(self, job_id: str) -> Submission:
        job = self.store.get(job_id)
        if job["state"] != JobState.VALIDATED:
            raise StateError(
                f"Job {job_id} is {job['state']}; only a VALIDATED job can be queued"
            )
        priority = job["priority"]
        self.store.transition(
            job_id, JobState.QUEUED, f"Added to queue with priority {priority}"
        )
        try:
            self.publish(job_id, job["spec"], job["queue"])
        except Unavailable as exc:
            self.store.transition(
                job_id, JobState.VALIDATED, f"Not queued, broker unreachable: {exc}"
            )
            raise
        position = self.store.queue_position(job_id, job["queue"])
        return Submission(
            self.store.get(job_id), True, "Job queued successfully", position
        )

    def cancel(self, job_id: str, reason: str = "Cancelled via REST API") -> None:
        """Cancel a job that has not finished.

        The state changes first, atomically, so a job that completes at the
        same moment is either cancelled or completed, never both. A queued
        job is then revoked and never starts; a running one sees the state
        within seconds and stops its tool.
        """
        self.store.transition(job_id, JobState.CANCELLED, reason)
        try:
            self.revoke(job_id)
        except Unavailable:
            log.warning("job %s cancelled; broker unreachable for revoke", job_id)
