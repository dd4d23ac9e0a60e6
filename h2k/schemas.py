"""The wire shapes of h2k, as marshmallow schemas.

The request schemas validate (and fill in defaults); the response schemas
document what the API returns and generate its OpenAPI description. Unknown
fields in a request are errors, so a misspelt option is never ignored.
"""

from __future__ import annotations

import uuid
from typing import Any

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    post_load,
    pre_load,
    validate,
    validates_schema,
)

from h2k.capabilities import OPERATIONS, QUEUES
from h2k.priority import DEFAULT_PRIORITY
from h2k.states import JobState

ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}\Z"
IMAGE_FORMATS = ("vmdk", "vhd", "vhdx", "vdi", "qcow2", "raw")
OUTPUT_FORMATS = ("qcow2", "raw")
# Operations that only read the image and may be run again safely.
IDEMPOTENT_BY_DEFAULT = frozenset({"convert", "inspect"})
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600

execution_mode_rule = validate.Regexp(
    r"^[A-Z][A-Z0-9_]{0,63}\Z", error="Must be UPPER_CASE."
)
job_id_field = validate.Regexp(
    ID_PATTERN,
    error="Must be 1-128 characters of letters, digits, '.', '_' or '-'.",
)


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


class ImageSpecSchema(StrictSchema):
    path = fields.String(required=True, validate=validate.Length(min=1, max=4096))
    format = fields.String(required=True, validate=validate.OneOf(IMAGE_FORMATS))
    checksum = fields.String(
        validate=validate.Regexp(
            r"^sha256:[0-9a-fA-F]{64}\Z", error="Must be 'sha256:' and 64 hex digits."
        )
    )
    size_bytes = fields.Integer(strict=True, validate=validate.Range(min=0))


class ExecutionPolicySchema(StrictSchema):
    timeout_seconds = fields.Integer(
        strict=True,
        load_default=6 * 3600,
        validate=validate.Range(min=1, max=MAX_TIMEOUT_SECONDS),
    )
    retry_count = fields.Integer(
        strict=True, load_default=0, validate=validate.Range(min=0, max=10)
    )
    priority = fields.Integer(
        strict=True, load_default=DEFAULT_PRIORITY, validate=validate.Range(0, 100)
    )
    idempotent = fields.Boolean(
        metadata={
            "description": "May the job be run again after a lost worker? "
            "Defaults to true for convert and inspect, false otherwise."
        }
    )


class AuditInfoSchema(StrictSchema):
    requested_by = fields.String(validate=validate.Length(max=256))
    ticket_id = fields.String(validate=validate.Length(max=128))
    tags = fields.List(
        fields.String(validate=validate.Length(min=1, max=64)),
        validate=validate.Length(max=32),
    )


class ConvertParametersSchema(StrictSchema):
    output_format = fields.String(
        load_default="qcow2", validate=validate.OneOf(OUTPUT_FORMATS)
    )
    compress = fields.Boolean(load_default=False)
    output_path = fields.String(validate=validate.Length(min=1, max=4096))
    overwrite = fields.Boolean(load_default=False)
    rate_limit_bytes = fields.Integer(
        strict=True,
        validate=validate.Range(min=65536),
        metadata={"description": "Cap the conversion at this many bytes a second."},
    )

    @validates_schema
    def _compression_needs_qcow2(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("compress") and data.get("output_format") != "qcow2":
            raise ValidationError(
                "Compression needs output_format qcow2.", field_name="compress"
            )


class InspectParametersSchema(StrictSchema):
    """inspect takes no parameters: it reads and reports."""


class ModifyingParametersSchema(StrictSchema):
    """What every operation that changes a guest disk accepts."""

    in_place = fields.Boolean(
        load_default=False,
        metadata={"description": "Change the image itself instead of an overlay."},
    )
    dry_run = fields.Boolean(
        load_default=False,
        metadata={"description": "Change nothing; report what would change."},
    )
    output_path = fields.String(
        validate=validate.Length(min=1, max=4096),
        metadata={
            "description": "Where the qcow2 overlay holding the changes goes; "
            "default <image dir>/<image stem>.<operation>.qcow2."
        },
    )
    overwrite = fields.Boolean(load_default=False)

    @validates_schema
    def _in_place_has_no_output(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("in_place") and data.get("output_path"):
            raise ValidationError(
                "An in-place change writes no overlay; drop output_path.",
                field_name="output_path",
            )


OFFLINE_FIXES = ("fstab", "bootloader", "vmware_tools", "network", "initramfs_config")


class OfflineFixParametersSchema(ModifyingParametersSchema):
    fixes = fields.List(
        fields.String(validate=validate.OneOf(OFFLINE_FIXES)),
        load_default=lambda: list(OFFLINE_FIXES),
        validate=validate.Length(min=1),
        metadata={"description": "Which fixes run; all by default."},
    )


class FsRepairParametersSchema(ModifyingParametersSchema):
    filesystems = fields.List(
        fields.String(validate=validate.Length(min=1, max=128)),
        metadata={"description": "UUIDs or labels to repair; all by default."},
    )


class InitramfsParametersSchema(ModifyingParametersSchema):
    kernels = fields.List(
        fields.String(validate=validate.Regexp(r"^[A-Za-z0-9._+-]{1,128}\Z")),
        metadata={"description": "Kernel versions to rebuild for; all by default."},
    )


# One parameter schema per operation h2k can run; an operation without one
# is refused at submission instead of waiting in a queue no worker serves.
PARAMETER_SCHEMAS: dict[str, type[Schema]] = {
    "convert": ConvertParametersSchema,
    "inspect": InspectParametersSchema,
    "offline_fix": OfflineFixParametersSchema,
    "boot_repair": ModifyingParametersSchema,
    "selinux_prep": ModifyingParametersSchema,
    "fs_repair": FsRepairParametersSchema,
    "initramfs_regenerate": InitramfsParametersSchema,
    "lvm_repair": ModifyingParametersSchema,
}


class JobSpecSchema(StrictSchema):
    job_id = fields.String(validate=job_id_field)
    operation = fields.String(required=True, validate=validate.OneOf(OPERATIONS))
    image = fields.Nested(ImageSpecSchema, required=True)
    parameters = fields.Dict(keys=fields.String(), load_default=dict)
    execution_policy = fields.Nested(ExecutionPolicySchema, load_default=dict)
    audit_info = fields.Nested(AuditInfoSchema, load_default=dict)
    capability_requirements = fields.List(
        fields.String(validate=validate.OneOf(QUEUES)), load_default=list
    )

    @pre_load
    def _fill_nested_defaults(self, data: Any, **_: Any) -> Any:
        # A missing policy still gets its defaults from the nested schema.
        if isinstance(data, dict):
            data = dict(data)
            for key in ("execution_policy", "audit_info"):
                if data.get(key) is None:
                    data[key] = {}
        return data

    @validates_schema(skip_on_field_errors=False)
    def _parameters_fit_operation(self, data: dict[str, Any], **_: Any) -> None:
        operation = data.get("operation")
        if operation not in OPERATIONS:
            return
        schema_class = PARAMETER_SCHEMAS.get(operation)
        if schema_class is None:
            raise ValidationError(
                f"Operation {operation} is not available in this version of h2k; "
                f"available: {', '.join(sorted(PARAMETER_SCHEMAS))}.",
                field_name="operation",
            )
        try:
            data["parameters"] = schema_class().load(data.get("parameters") or {})
        except ValidationError as exc:
            raise ValidationError({"parameters": exc.messages}) from exc

    @post_load
    def _complete(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        data.setdefault("job_id", str(uuid.uuid4()))
        policy = data["execution_policy"]
        policy.setdefault("idempotent", data["operation"] in IDEMPOTENT_BY_DEFAULT)
        data["capability_requirements"] = sorted(set(data["capability_requirements"]))
        return data


class HistoryEntrySchema(Schema):
    state = fields.String(validate=validate.OneOf([s.value for s in JobState]))
    timestamp = fields.String()
    reason = fields.String()


class ProgressEventSchema(Schema):
    job_id = fields.String()
    timestamp = fields.String()
    phase = fields.String()
    percentage = fields.Integer(allow_none=True)
    message = fields.String()
    details = fields.Dict()


class JobErrorSchema(Schema):
    phase = fields.String()
    code = fields.String()
    message = fields.String()
    details = fields.Dict()


class JobResultSchema(Schema):
    """What an operation returns; its keys depend on the operation."""

    class Meta:
        unknown = "include"


class JobSubmitResponseSchema(Schema):
    job_id = fields.String()
    state = fields.String()
    message = fields.String()
    queue_position = fields.Integer(allow_none=True)


class JobStatusSchema(Schema):
    job_id = fields.String()
    spec = fields.Nested(JobSpecSchema)
    state = fields.String()
    state_history = fields.List(fields.Nested(HistoryEntrySchema))
    result = fields.Dict(allow_none=True)
    error = fields.Nested(JobErrorSchema, allow_none=True)
    latest_event = fields.Nested(ProgressEventSchema, allow_none=True)
    worker_id = fields.String(allow_none=True)
    attempt = fields.Integer(metadata={"description": "Runs started so far."})
    queue = fields.String()
    created_at = fields.String()
    updated_at = fields.String()


class JobSummarySchema(Schema):
    job_id = fields.String()
    state = fields.String()
    created_at = fields.String()
    is_terminal = fields.Boolean()
    operation = fields.String()
    priority = fields.Integer()


class JobListSchema(Schema):
    total = fields.Integer()
    jobs = fields.List(fields.Nested(JobSummarySchema))
    next_cursor = fields.String(
        allow_none=True,
        metadata={
            "description": "Pass as ?cursor= for the next page; null at the end."
        },
    )


class JobListQuerySchema(StrictSchema):
    state = fields.String(validate=validate.OneOf([s.value for s in JobState]))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.Integer(validate=validate.Range(min=0))


class SubmitQuerySchema(StrictSchema):
    queue = fields.Boolean(load_default=True)


class EventsQuerySchema(StrictSchema):
    since = fields.AwareDateTime(
        metadata={"description": "ISO 8601 with a zone; only later events."}
    )


class StreamQuerySchema(StrictSchema):
    since = fields.String(
        metadata={
            "description": "Resume after this event id (as Last-Event-ID) or "
            "ISO 8601 timestamp."
        }
    )


class CancelResponseSchema(Schema):
    job_id = fields.String()
    state = fields.String()
    message = fields.String()


class SystemInfoSchema(Schema):
    class Meta:
        unknown = "include"

    hostname = fields.String(validate=validate.Length(max=255))
    os = fields.String(validate=validate.Length(max=64))
    kernel = fields.String(validate=validate.Length(max=128))
    architecture = fields.String(validate=validate.Length(max=32))
    memory_mb = fields.Integer(strict=True, validate=validate.Range(min=0))
    disk_space_mb = fields.Integer(strict=True, validate=validate.Range(min=0))


class DequeueRequestSchema(StrictSchema):
    """A polling worker: who it is and what it can do."""

    worker_id = fields.String(required=True, validate=job_id_field)
    capabilities = fields.List(
        fields.String(validate=validate.OneOf(QUEUES)), required=True
    )
    execution_mode = fields.String(validate=execution_mode_rule)


class WorkerRegistrationSchema(DequeueRequestSchema):
    system_info = fields.Nested(SystemInfoSchema, load_default=dict)


class WorkerRegisteredSchema(Schema):
    worker_id = fields.String()
    message = fields.String()
    capabilities = fields.List(fields.String())
    registered_at = fields.String()


class HeartbeatResponseSchema(Schema):
    worker_id = fields.String()
    message = fields.String()
    timestamp = fields.String()


class WorkerSchema(Schema):
    worker_id = fields.String()
    capabilities = fields.List(fields.String())
    system_info = fields.Dict()
    execution_mode = fields.String(allow_none=True)
    registered_at = fields.String()
    last_heartbeat = fields.String()
    active = fields.Boolean()


class WorkerListSchema(Schema):
    total = fields.Integer()
    active = fields.Integer()
    workers = fields.List(fields.Nested(WorkerSchema))


class WorkerUnregisteredSchema(Schema):
    worker_id = fields.String()
    message = fields.String()


class QueueStatusSchema(Schema):
    total_jobs = fields.Integer()
    by_priority = fields.Dict(keys=fields.String(), values=fields.Integer())
    by_queue = fields.Dict(keys=fields.String(), values=fields.Integer())


class HealthSchema(Schema):
    status = fields.String()
    version = fields.String()
    timestamp = fields.String()
    workers = fields.Integer()
    active_jobs = fields.Integer()
    checks = fields.Dict()


class ErrorBodySchema(Schema):
    code = fields.Integer()
    message = fields.String()
    path = fields.String()
    timestamp = fields.String()
    fields_ = fields.Dict(
        data_key="fields",
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "For 422: each bad field and what is wrong."},
    )


class ErrorEnvelopeSchema(Schema):
    error = fields.Nested(ErrorBodySchema)
