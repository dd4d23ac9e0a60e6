"""Convert a VMware or Hyper-V disk into a KVM image (qcow2 or raw).

The output appears under its final name only once it is whole and proven to
hold the source's data: qemu-img writes a hidden temporary file beside it,
qemu-img check and compare verify that file, and only then is it renamed.
Whatever stops the job on the way (an error, a cancellation, a time limit, a
worker shutting down) the temporary file is removed, so a file under the
final name is always a complete, verified conversion.

Phases reported: ``validation``, ``conversion`` (qemu-img's progress, one
event per whole percent), ``verification``, ``finalize``. Error codes come
from :mod:`h2k.operations.codes`.
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
CONVERSION = "conversion"
VERIFICATION = "verification"
FINALIZE = "finalize"

OUTPUT_SUFFIXES: dict[str, str] = {"qcow2": ".qcow2", "raw": ".raw"}
DEFAULT_OUTPUT_FORMAT = "qcow2"

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
# link(2) errors meaning "this filesystem has no hard links", not "refused".
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


@dataclass(frozen=True)
class _Plan:
    source: str
    source_format: str
    virtual_size: int
    output: str
    output_format: str
    compress: bool
    overwrite: bool
    rate_limit: int | None
    deadline: float | None


def run(ctx: OperationContext) -> dict[str, Any]:
    """Convert ``ctx.spec["image"]`` as ``ctx.spec["parameters"]`` ask."""
    ctx.report(VALIDATION, 0, "Checking the image and the parameters")
    plan = _plan(ctx)
    ctx.report(
        VALIDATION,
        0,
        f"{plan.source} is a {plan.source_format} image; "
        f"writing {plan.output_format} to {plan.output}",
        {"virtual_size_bytes": str(plan.virtual_size)},
    )
    temp = _temp_path(plan.output, ctx.job_id)
    _remove(temp)
    try:
        _convert(ctx, plan, temp)
        verification = _verify(ctx, plan, temp)
        _install(ctx, plan, temp)
    finally:
        _remove(temp)

    size = os.stat(plan.output)
    result = {
        "output_path": plan.output,
        "output_format": plan.output_format,
        "output_size_bytes": size.st_blocks * 512,
        "output_file_size_bytes": size.st_size,
        "virtual_size_bytes": plan.virtual_size,
        "source": {"path": plan.source, "format": plan.source_format},
        "compressed": plan.compress,
        "verification": verification,
    }
    ctx.report(FINALIZE, 100, f"Wrote {plan.output}", {"output_path": plan.output})
    log.info("job %s converted %s to %s", ctx.job_id, plan.source, plan.output)
    return result


def _fail(
    phase: str, code: str, message: str, *, retryable: bool = False, **details: Any
) -> OperationError:
    return OperationError(
        phase, code, message, retryable=retryable, details=details or None
    )


def _invalid_parameter(field: str, message: str) -> OperationError:
    return _fail(
        VALIDATION, codes.INVALID_PARAMETERS, message, fields={field: [message]}
    )


def _from_invalid(exc: InvalidInput, code: str) -> OperationError:
    return _fail(VALIDATION, code, exc.message, fields=exc.fields)


def _plan(ctx: OperationContext) -> _Plan:
    """Read and check the spec against the files as they are now.

    Submission validated the spec, but files change between submission and
    run, so paths and the image format are checked again here.
    """
    spec = ctx.spec
    image = spec.get("image") or {}
    params = ctx.parameters
    policy = spec.get("execution_policy") or {}

    image_path = image.get("path")
    if not isinstance(image_path, str) or not os.path.isabs(image_path):
        raise _invalid_parameter("image.path", "image.path must be an absolute path")
    source_format = image.get("format")
    if source_format not in qemu_img.QEMU_FORMATS:
        known = ", ".join(sorted(qemu_img.QEMU_FORMATS))
        raise _invalid_parameter(
            "image.format",
            f"image.format is {source_format!r}; expected one of {known}",
        )
    output_format = params.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if output_format not in OUTPUT_SUFFIXES:
        raise _invalid_parameter(
            "parameters.output_format",
            f"parameters.output_format is {output_format!r}; expected qcow2 or raw",
        )
    compress = _flag(params, "compress")
    overwrite = _flag(params, "overwrite")
    if compress and output_format != "qcow2":
        raise _invalid_parameter(
            "parameters.compress", "compression needs qcow2 output, not raw"
        )
    rate_limit = params.get("rate_limit_bytes")
    if rate_limit is not None and (
        isinstance(rate_limit, bool)
        or not isinstance(rate_limit, int)
        or rate_limit <= 0
    ):
        raise _invalid_parameter(
            "parameters.rate_limit_bytes",
            "parameters.rate_limit_bytes must be a positive whole number of bytes/s",
        )
    timeout = policy.get("timeout_seconds")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or timeout <= 0
    ):
        raise _invalid_parameter(
            "execution_policy.timeout_seconds",
            "execution_policy.timeout_seconds must be a positive number",
        )
    deadline = None if timeout is None else time.monotonic() + float(timeout)

    roots = ctx.allowed_roots
    try:
        source = resolve_inside(image_path, roots, "image.path")
    except InvalidInput as exc:
        raise _from_invalid(exc, codes.PATH_NOT_ALLOWED) from exc
    if not os.path.exists(source) or os.path.isdir(source):
        message = f"{image_path} does not exist or is a directory"
        raise _fail(
            VALIDATION, codes.INVALID_IMAGE, message, fields={"image.path": [message]}
        )

    try:
        details = qemu_img.verify_declared_format(source, source_format, roots)
        inputs = qemu_img.image_files(source, source_format, roots)
    except qemu_img.FormatMismatch as exc:
        raise _from_invalid(exc, codes.FORMAT_MISMATCH) from exc
    except qemu_img.ReferenceOutsideRoots as exc:
        raise _from_invalid(exc, codes.PATH_NOT_ALLOWED) from exc
    except InvalidInput as exc:
        raise _from_invalid(exc, codes.INVALID_IMAGE) from exc
    except ToolError as exc:
        raise _tool_failure(
            VALIDATION, codes.TOOL_FAILED, "qemu-img info", exc
        ) from exc

    output = _output_path(image_path, params.get("output_path"), output_format, roots)
    _check_output(output, inputs, overwrite)
    return _Plan(
        source=source,
        source_format=source_format,
        virtual_size=int(details.get("virtual-size", 0)),
        output=output,
        output_format=output_format,
        compress=compress,
        overwrite=overwrite,
        rate_limit=rate_limit,
        deadline=deadline,
    )


def _flag(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise _invalid_parameter(
            f"parameters.{name}", f"parameters.{name} must be true or false"
        )
    return value


def _output_path(
    image_path: str, requested: Any, output_format: str, roots: tuple[str, ...]
) -> str:
    """The real path to write: the requested one, or the image's name re-suffixed."""
    field = "parameters.output_path"
    if requested is None:
        stem = os.path.splitext(os.path.basename(os.path.normpath(image_path)))[0]
        candidate = os.path.join(
            os.path.dirname(os.path.normpath(image_path)),
            stem + OUTPUT_SUFFIXES[output_format],
        )
    elif isinstance(requested, str) and os.path.isabs(requested):
        candidate = requested
    else:
        raise _invalid_parameter(field, f"{field} must be an absolute path")
    try:
        output = resolve_inside(candidate, roots, field)
    except InvalidInput as exc:
        raise _from_invalid(exc, codes.PATH_NOT_ALLOWED) from exc
    if not os.path.isdir(os.path.dirname(output)):
        raise _invalid_parameter(
            field, f"the directory of {candidate} does not exist; create it first"
        )
    return output


def _check_output(output: str, inputs: list[str], overwrite: bool) -> None:
    field = "parameters.output_path"
    exists = os.path.lexists(output)
    for name in inputs:
        same = output == name or (
            exists and os.path.exists(name) and os.path.samefile(output, name)
        )
        if same:
            message = (
                f"the output {output} would replace {name}, which the conversion "
                f"reads; set {field} to another file"
            )
            raise _fail(
                VALIDATION, codes.OUTPUT_IS_INPUT, message, fields={field: [message]}
            )
    if not exists:
        return
    mode = os.lstat(output).st_mode
    if not stat.S_ISREG(mode):
        raise _invalid_parameter(field, f"{output} exists and is not a regular file")
    if not overwrite:
        message = (
            f"{output} already exists; set parameters.overwrite to true to replace "
            f"it, or choose another {field}"
        )
        raise _fail(VALIDATION, codes.OUTPUT_EXISTS, message, fields={field: [message]})


def _temp_path(output: str, job_id: str) -> str:
    """A hidden name beside the output, so the final rename stays on one filesystem."""
    safe_id = _UNSAFE_NAME_CHARS.sub("_", job_id)
    directory, name = os.path.split(output)
    return os.path.join(directory, f".{name}.h2k-{safe_id}.part")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("removed temporary file %s", path)


def _remaining(plan: _Plan, phase: str) -> float | None:
    """Seconds left before the job's deadline; a passed deadline is a timeout."""
    if plan.deadline is None:
        return None
    left = plan.deadline - time.monotonic()
    if left <= 0:
        raise _fail(
            phase, codes.TIMEOUT, "the job ran past its time limit", retryable=True
        )
    return left


def _stop_if_asked(ctx: OperationContext, phase: str) -> None:
    if ctx.should_stop():
        raise _fail(phase, codes.CANCELLED, "the job was cancelled")


def _tool_failure(phase: str, code: str, what: str, exc: ToolError) -> OperationError:
    if isinstance(exc, ToolCancelled):
        return _fail(phase, codes.CANCELLED, f"the job was cancelled during {what}")
    if isinstance(exc, ToolTimeout):
        return _fail(
            phase,
            codes.TIMEOUT,
            f"{what} was stopped at the job's time limit",
            retryable=True,
        )
    return _fail(
        phase,
        code,
        f"{what} failed (exit status {exc.returncode}): {qemu_img.last_line(exc)}",
        retryable=True,
    )


@contextmanager
def _tool_errors(phase: str, code: str, what: str) -> Iterator[None]:
    try:
        yield
    except ToolError as exc:
        raise _tool_failure(phase, code, what, exc) from exc


def _convert(ctx: OperationContext, plan: _Plan, temp: str) -> None:
    total = plan.virtual_size
    last = -1

    def progress(percent: float) -> None:
        nonlocal last
        whole = int(percent)
        if whole <= last:
            return
        last = whole
        done = total * whole // 100
        ctx.report(
            CONVERSION,
            whole,
            f"Converted {whole}%",
            {"bytes_processed": str(done), "total_bytes": str(total)},
        )

    _stop_if_asked(ctx, CONVERSION)
    progress(0)
    with _tool_errors(CONVERSION, codes.CONVERSION_FAILED, "qemu-img convert"):
        qemu_img.convert(
            plan.source,
            plan.source_format,
            temp,
            plan.output_format,
            compress=plan.compress,
            rate_limit=plan.rate_limit,
            on_progress=progress,
            should_stop=ctx.should_stop,
            timeout=_remaining(plan, CONVERSION),
        )
    progress(100)


def _verify(ctx: OperationContext, plan: _Plan, temp: str) -> dict[str, Any]:
    """Prove the temporary output is sound and holds the source's data."""
    _stop_if_asked(ctx, VERIFICATION)
    ctx.report(VERIFICATION, None, "Checking the output with qemu-img check")
    with _tool_errors(VERIFICATION, codes.TOOL_FAILED, "qemu-img check"):
        checked = qemu_img.check(
            temp,
            plan.output_format,
            should_stop=ctx.should_stop,
            timeout=_remaining(plan, VERIFICATION),
        )
    with _tool_errors(VERIFICATION, codes.TOOL_FAILED, "qemu-img info"):
        output_info = qemu_img.info(temp, plan.output_format)
    if checked["supported"] and (checked["corruptions"] or checked["check_errors"]):
        raise _fail(
            VERIFICATION,
            codes.VERIFICATION_FAILED,
            f"qemu-img check found the output damaged: {checked['message']}",
            check=checked,
        )
    output_size = int(output_info.get("virtual-size", -1))
    if output_size != plan.virtual_size:
        raise _fail(
            VERIFICATION,
            codes.VERIFICATION_FAILED,
            f"the output's virtual size is {output_size} bytes, "
            f"the source's {plan.virtual_size}",
        )

    _stop_if_asked(ctx, VERIFICATION)
    ctx.report(VERIFICATION, None, "Comparing the output with the source")
    with _tool_errors(VERIFICATION, codes.TOOL_FAILED, "qemu-img compare"):
        compared = qemu_img.compare(
            plan.source,
            plan.source_format,
            temp,
            plan.output_format,
            ctx.should_stop,
            timeout=_remaining(plan, VERIFICATION),
        )
    if not compared["identical"]:
        raise _fail(
            VERIFICATION,
            codes.VERIFICATION_FAILED,
            f"the output differs from the source: {compared['message']}",
            compare=compared,
        )
    ctx.report(VERIFICATION, None, "The output matches the source", {"check": checked})
    return {"check": checked, "compare": compared}


def _install(ctx: OperationContext, plan: _Plan, temp: str) -> None:
    """Flush the output and give it its final name.

    qemu-img convert writes with cache=unsafe and never flushes, so the data
    is synced before the rename; otherwise a crash could leave a final name
    over an incomplete file. Without ``overwrite`` the name is taken with a
    hard link, which fails if another file appeared there meanwhile.
    """
    _stop_if_asked(ctx, FINALIZE)
    ctx.report(FINALIZE, None, f"Moving the output to {plan.output}")
    try:
        _fsync(temp)
        if plan.overwrite:
            os.replace(temp, plan.output)
        else:
            _link_no_replace(temp, plan.output)
        _fsync(os.path.dirname(plan.output))
    except FileExistsError as exc:
        message = f"{plan.output} appeared while converting; it was left as it is"
        raise _fail(FINALIZE, codes.OUTPUT_EXISTS, message) from exc
    except OSError as exc:
        message = f"cannot move the output to {plan.output}: {exc.strerror or exc}"
        raise _fail(FINALIZE, codes.TOOL_FAILED, message, retryable=True) from exc


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
