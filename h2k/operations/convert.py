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

import logging
import os
from dataclasses import dataclass
from typing import Any

from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import (
    FINALIZE,
    VALIDATION,
    Deadline,
    check_output,
    check_source,
    fail,
    flag,
    image_stem,
    install,
    invalid_parameter,
    output_path,
    remove,
    stop_if_asked,
    temp_path,
    tool_errors,
)
from h2k.tools import qemu_img

log = logging.getLogger(__name__)

CONVERSION = "conversion"
VERIFICATION = "verification"

OUTPUT_SUFFIXES: dict[str, str] = {"qcow2": ".qcow2", "raw": ".raw"}
DEFAULT_OUTPUT_FORMAT = "qcow2"


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
    deadline: Deadline


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
    temp = temp_path(plan.output, ctx.job_id)
    remove(temp)
    try:
        _convert(ctx, plan, temp)
        verification = _verify(ctx, plan, temp)
        install(ctx, temp, plan.output, plan.overwrite)
    finally:
        remove(temp)

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


def _plan(ctx: OperationContext) -> _Plan:
    params = ctx.parameters
    output_format = params.get("output_format", DEFAULT_OUTPUT_FORMAT)
    if output_format not in OUTPUT_SUFFIXES:
        raise invalid_parameter(
            "parameters.output_format",
            f"parameters.output_format is {output_format!r}; expected qcow2 or raw",
        )
    compress = flag(params, "compress")
    overwrite = flag(params, "overwrite")
    if compress and output_format != "qcow2":
        raise invalid_parameter(
            "parameters.compress", "compression needs qcow2 output, not raw"
        )
    rate_limit = params.get("rate_limit_bytes")
    if rate_limit is not None and (
        isinstance(rate_limit, bool)
        or not isinstance(rate_limit, int)
        or rate_limit <= 0
    ):
        raise invalid_parameter(
            "parameters.rate_limit_bytes",
            "parameters.rate_limit_bytes must be a positive whole number of bytes/s",
        )
    deadline = Deadline(ctx.spec)

    source = check_source(ctx)
    default_name = (
        image_stem(ctx.spec["image"]["path"]) + OUTPUT_SUFFIXES[output_format]
    )
    output = output_path(ctx, default_name, ctx.allowed_roots)
    check_output(output, source.files, overwrite)
    return _Plan(
        source=source.path,
        source_format=source.format,
        virtual_size=source.virtual_size,
        output=output,
        output_format=output_format,
        compress=compress,
        overwrite=overwrite,
        rate_limit=rate_limit,
        deadline=deadline,
    )


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

    stop_if_asked(ctx, CONVERSION)
    progress(0)
    with tool_errors(CONVERSION, codes.CONVERSION_FAILED, "qemu-img convert"):
        qemu_img.convert(
            plan.source,
            plan.source_format,
            temp,
            plan.output_format,
            compress=plan.compress,
            rate_limit=plan.rate_limit,
            on_progress=progress,
            should_stop=ctx.should_stop,
            timeout=plan.deadline.remaining(CONVERSION),
        )
    progress(100)


def _verify(ctx: OperationContext, plan: _Plan, temp: str) -> dict[str, Any]:
    """Prove the temporary output is sound and holds the source's data."""
    stop_if_asked(ctx, VERIFICATION)
    ctx.report(VERIFICATION, None, "Checking the output with qemu-img check")
    with tool_errors(VERIFICATION, codes.TOOL_FAILED, "qemu-img check"):
        checked = qemu_img.check(
            temp,
            plan.output_format,
            should_stop=ctx.should_stop,
            timeout=plan.deadline.remaining(VERIFICATION),
        )
    with tool_errors(VERIFICATION, codes.TOOL_FAILED, "qemu-img info"):
        output_info = qemu_img.info(temp, plan.output_format)
    if checked["supported"] and (checked["corruptions"] or checked["check_errors"]):
        raise fail(
            VERIFICATION,
            codes.VERIFICATION_FAILED,
            f"qemu-img check found the output damaged: {checked['message']}",
            check=checked,
        )
    output_size = int(output_info.get("virtual-size", -1))
    if output_size != plan.virtual_size:
        raise fail(
            VERIFICATION,
            codes.VERIFICATION_FAILED,
            f"the output's virtual size is {output_size} bytes, "
            f"the source's {plan.virtual_size}",
        )

    stop_if_asked(ctx, VERIFICATION)
    ctx.report(VERIFICATION, None, "Comparing the output with the source")
    with tool_errors(VERIFICATION, codes.TOOL_FAILED, "qemu-img compare"):
        compared = qemu_img.compare(
            plan.source,
            plan.source_format,
            temp,
            plan.output_format,
            ctx.should_stop,
            timeout=plan.deadline.remaining(VERIFICATION),
        )
    if not compared["identical"]:
        raise fail(
            VERIFICATION,
            codes.VERIFICATION_FAILED,
            f"the output differs from the source: {compared['message']}",
            compare=compared,
        )
    ctx.report(VERIFICATION, None, "The output matches the source", {"check": checked})
    return {"check": checked, "compare": compared}
