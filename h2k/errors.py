"""The errors h2k raises, one tree under :class:`H2KError`.

- :class:`InvalidInput`: a request or job spec fails validation; carries a
  message per field (dotted path).
- :class:`NotFound`: an unknown job or worker.
- :class:`Conflict`: a job id that exists with a different spec.
- :class:`StateError`: the job's state refuses the request (cancel a finished
  job, queue a running one).
- :class:`Unavailable`: Redis or the broker cannot be reached.
- :class:`ToolError`: an external tool (qemu-img, qemu-nbd, ...) failed.
  :class:`ToolCancelled` and :class:`ToolTimeout` say why it was stopped.
- :class:`OperationError`: an operation cannot proceed; carries the
  ``{phase, code, message}`` that a failed job records.
"""

from __future__ import annotations

from typing import Any


class H2KError(Exception):
    """Base of every error h2k raises on purpose."""


class InvalidInput(H2KError):
    """Input that fails validation; ``fields`` maps a dotted path to messages."""

    def __init__(self, message: str, fields: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.message = message
        self.fields = fields or {}

    def __reduce__(self) -> Any:
        return (type(self), (self.message, self.fields))


class NotFound(H2KError):
    """The job or worker named does not exist."""


class Conflict(H2KError):
    """The request collides with what is stored (same id, different spec)."""


class StateError(H2KError):
    """The job's current state does not allow the request."""


class Unavailable(H2KError):
    """A backing service (Redis, the broker) cannot be reached."""


class ToolError(H2KError):
    """An external tool exited with an error."""

    def __init__(
        self,
        tool: str,
        args: list[str],
        returncode: int | None,
        stderr: str = "",
    ):
        self.tool = tool
        self.argv = list(args)
        self.returncode = returncode
        self.stderr = stderr.strip()
        detail = self.stderr.splitlines()[-1] if self.stderr else "no output"
        super().__init__(f"{tool} exited with status {returncode}: {detail}")

    def __reduce__(self) -> Any:
        # Celery pickles exceptions between processes; keep every field.
        return (type(self), (self.tool, self.argv, self.returncode, self.stderr))


class ToolCancelled(ToolError):
    """The tool was stopped because its job was cancelled."""


class ToolTimeout(ToolError):
    """The tool was stopped because it ran past its time limit."""


class OperationError(H2KError):
    """An operation cannot proceed.

    ``code`` comes from the documented list in :mod:`h2k.operations.codes`;
    ``retryable`` says whether running the same job again may succeed.
    """

    def __init__(
        self,
        phase: str,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        details: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.phase = phase
        self.code = code
        self.message = message
        self.retryable = retryable
        self.details = details or {}

    def __reduce__(self) -> Any:
        return (_rebuild_operation_error, (type(self), self.as_dict(), self.retryable))

    def as_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "phase": self.phase,
            "code": self.code,
            "message": self.message,
        }
        if self.details:
            error["details"] = self.details
        return error


def _rebuild_operation_error(
    kind: type[OperationError], error: dict[str, Any], retryable: bool
) -> OperationError:
    return kind(
        error["phase"],
        error["code"],
        error["message"],
        retryable=retryable,
        details=error.get("details"),
    )
