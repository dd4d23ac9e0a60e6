"""What every operation does the same way: check its source again, keep its
deadline, stop when asked, report progress, map tool failures onto codes,
and put an output in place only when it is whole.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from h2k.errors import (
    InvalidInput,
    OperationError,
    ToolCancelled,
    ToolError,
    ToolTimeout,
)
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.paths import resolve_inside
from h2k.tools import qemu_img

log = logging.getLogger(__name__)

VALIDATION = "validation"
FINALIZE = "finalize"
OUTPUT_FIELD = "parameters.output_path"

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
# link(2) errors meaning "this filesystem has no hard links", not "refused".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def fail(
    phase: str, code: str, message: str, *, retryable: bool = False, **details: Any
) -> OperationError:
    return OperationError(
        phase, code, message, retryable=retryable, details=details or None
    )


def invalid_parameter(field: str, message: str) -> OperationError:
    return fail(
        VALIDATION, codes.INVALID_PARAMETERS, message, fields={field: [message]}
    )


def from_invalid(exc: InvalidInput, code: str) -> OperationError:
    return fail(VALIDATION, code, exc.message, fields=exc.fields)


def flag(params: dict[str, Any], name: str, default: bool = False) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise invalid_parameter(
            f"parameters.{name}", f"parameters.{name} must be true or false"
        )
    return value


class Deadline:
    """The job's time limit (``execution_policy.timeout_seconds``), from the start."""

    def __init__(self, spec: dict[str, Any]):
        timeout = (spec.get("execution_policy") or {}).get("timeout_seconds")
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or timeout <= 0
        ):
            raise invalid_parameter(
                "execution_policy.timeout_seconds",
                "execution_policy.timeout_seconds must be a positive number",
            )
        self.at = None if timeout is None else time.monotonic() + float(timeout)

    def remaining(self, phase: str) -> float | None:
        """Seconds left for the next tool; a passed deadline is a timeout."""
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise fail(
                phase, codes.TIMEOUT, "the job ran past its time limit", retryable=True
            )
        return left

    def capped(self, phase: str, cap: float) -> float:
        """Seconds the next tool may run: ``cap``, or less when the job's time
        limit comes sooner."""
        left = self.remaining(phase)
        return cap if left is None else min(cap, left)


def stop_if_asked(ctx: OperationContext, phase: str) -> None:
    if ctx.should_stop():
        raise fail(phase, codes.CANCELLED, "the job was cancelled")


def report_item(
    ctx: OperationContext,
    phase: str,
    index: int,
    total: int,
    message: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Report work on item ``index`` (from 0) of ``total``, stopping first if
    the job was cancelled: the percentage counts the items already done, the
    message ends with which one this is."""
    stop_if_asked(ctx, phase)
    ctx.report(
        phase, index * 100 // total, f"{message} ({index + 1} of {total})", details
    )


def tool_failure(phase: str, code: str, what: str, exc: ToolError) -> OperationError:
    if isinstance(exc, ToolCancelled):
        return fail(phase, codes.CANCELLED, f"the job was cancelled during {what}")
    if isinstance(exc, ToolTimeout):
        return fail(
            phase,
            codes.TIMEOUT,
            f"{what} was stopped at the job's time limit",
            retryable=True,
        )
    return fail(
        phase,
        code,
        f"{what} failed (exit status {exc.returncode}): {qemu_img.last_line(exc)}",
        retryable=True,
    )


@contextmanager
def tool_errors(phase: str, code: str, what: str) -> Iterator[None]:
    """Turn a failing tool into an :class:`OperationError` with ``code``."""
    try:
        yield
    except ToolError as exc:
        raise tool_failure(phase, code, what, exc) from exc


@dataclass(frozen=True)
class Source:
    path: str
    format: str
    info: dict[str, Any]
    # Every file the image reads: itself, extents, backing chain.
    files: list[str]

    @property
    def virtual_size(self) -> int:
        return int(self.info.get("virtual-size", 0))


def check_source(ctx: OperationContext) -> Source:
    """The job's image, checked again against the files as they are now.

    Submission validated the spec, but files change between submission and
    run, so the path and the declared format are checked again here.
    """
    image = ctx.spec.get("image") or {}
    image_path = image.get("path")
    if not isinstance(image_path, str) or not os.path.isabs(image_path):
        raise invalid_parameter("image.path", "image.path must be an absolute path")
    source_format = image.get("format")
    if source_format not in qemu_img.QEMU_FORMATS:
        known = ", ".join(sorted(qemu_img.QEMU_FORMATS))
        raise invalid_parameter(
            "image.format",
            f"image.format is {source_format!r}; expected one of {known}",
        )

    roots = ctx.allowed_roots
    try:
        source = resolve_inside(image_path, roots, "image.path")
    except InvalidInput as exc:
        raise from_invalid(exc, codes.PATH_NOT_ALLOWED) from exc
    if not os.path.exists(source) or os.path.isdir(source):
        message = f"{image_path} does not exist or is a directory"
        raise fail(
            VALIDATION, codes.INVALID_IMAGE, message, fields={"image.path": [message]}
        )

    try:
        details = qemu_img.verify_declared_format(source, source_format, roots)
        files = qemu_img.image_files(source, source_format, roots)
    except qemu_img.FormatMismatch as exc:
        raise from_invalid(exc, codes.FORMAT_MISMATCH) from exc
    except qemu_img.ReferenceOutsideRoots as exc:
        raise from_invalid(exc, codes.PATH_NOT_ALLOWED) from exc
    except InvalidInput as exc:
        raise from_invalid(exc, codes.INVALID_IMAGE) from exc
    except ToolError as exc:
        raise tool_failure(VALIDATION, codes.TOOL_FAILED, "qemu-img info", exc) from exc
    return Source(source, source_format, details, files)


def output_path(
    ctx: OperationContext, default_name: str, roots: tuple[str, ...]
) -> str:
    """The real path to write: ``parameters.output_path``, or ``default_name``
    in the image's directory."""
    requested = ctx.parameters.get("output_path")
    image_path = os.path.normpath(ctx.spec["image"]["path"])
    if requested is None:
        candidate = os.path.join(os.path.dirname(image_path), default_name)
    elif isinstance(requested, str) and os.path.isabs(requested):
        candidate = requested
    else:
        raise invalid_parameter(
            OUTPUT_FIELD, f"{OUTPUT_FIELD} must be an absolute path"
        )
    try:
        output = resolve_inside(candidate, roots, OUTPUT_FIELD)
    except InvalidInput as exc:
        raise from_invalid(exc, codes.PATH_NOT_ALLOWED) from exc
    if not os.path.isdir(os.path.dirname(output)):
        raise invalid_parameter(
            OUTPUT_FIELD,
            f"the directory of {candidate} does not exist; create it first",
        )
    return output


def image_stem(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def check_output(output: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an output that is an input, or that exists without ``overwrite``."""
    exists = os.path.lexists(output)
    for name in inputs:
        same = output == name or (
            exists and os.path.exists(name) and os.path.samefile(output, name)
        )
        if same:
            message = (
                f"the output {output} would replace {name}, which the job "
                f"reads; set {OUTPUT_FIELD} to another file"
            )
            raise fail(
                VALIDATION,
                codes.OUTPUT_IS_INPUT,
                message,
                fields={OUTPUT_FIELD: [message]},
            )
    if not exists:
        return
    mode = os.lstat(output).st_mode
    if not stat.S_ISREG(mode):
        raise invalid_parameter(
            OUTPUT_FIELD, f"{output} exists and is not a regular file"
        )
    if not overwrite:
        message = (
            f"{output} already exists; set parameters.overwrite to true to replace "
            f"it, or choose another {OUTPUT_FIELD}"
        )
        raise fail(
            VALIDATION, codes.OUTPUT_EXISTS, message, fields={OUTPUT_FIELD: [message]}
        )


def temp_path(output: str, job_id: str) -> str:
    """A hidden name beside the output, so the final rename stays on one filesystem."""
    safe_id = _UNSAFE_NAME_CHARS.sub("_", job_id)
    directory, name = os.path.split(output)
    return os.path.join(directory, f".{name}.h2k-{safe_id}.part")


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("removed temporary file %s", path)


def install(ctx: OperationContext, temp: str, output: str, overwrite: bool) -> None:
    """Flush ``temp`` and give it its final name.

    qemu-img writes with cache=unsafe and never flushes, so the data is
    synced before the rename; otherwise a crash could leave a final name over
    an incomplete file. Without ``overwrite`` the name is taken with a hard
    link, which fails if another file appeared there meanwhile.
    """
    stop_if_asked(ctx, FINALIZE)
    ctx.report(FINALIZE, None, f"Moving the output to {output}")
    try:
        _fsync(temp)
        if overwrite:
            os.replace(temp, output)
        else:
            _link_no_replace(temp, output)
        _fsync(os.path.dirname(output))
    except FileExistsError as exc:
        message = f"{output} appeared while the job ran; it was left as it is"
        raise fail(FINALIZE, codes.OUTPUT_EXISTS, message) from exc
    except OSError as exc:
        message = f"cannot move the output to {output}: {exc.strerror or exc}"
        raise fail(FINALIZE, codes.TOOL_FAILED, message, retryable=True) from exc


def _link_no_replace(temp: str, output: str) -> None:
    try:
        os.link(temp, output)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(output):
            raise FileExistsError(errno.EEXIST, "File exists", output) from exc
        os.rename(temp, output)
        return
    os.unlink(temp)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
