"""Convert a VMware or Hyper-V disk into a KVM image (qcow2 or raw).

The output appears under its final name only once it is whole and proven to
hold the source's data: qemu-img writes a hidden temporary file beside it,
qemu-img check and compare verify that file, and only then is it renamed.
Whatever stops the job on the way (an error, a cancellation, a time limit, a
worker shutting down) the temporary file is removed, so a file under the
final name is always a complete, verified conversion.

Before anything is written, two pre-flight checks run in the validation
phase. When the job gives ``image.checksum``, the image is hashed (see
:mod:`h2k.tools.checksum` for which files a checksum covers) and a mismatch
stops the job with ``CHECKSUM_MISMATCH``. Then ``qemu-img measure`` says how
much the output needs, and when the output's directory has less free space
(``statvfs``: the blocks free to unprivileged users) the job stops with
``INSUFFICIENT_SPACE``. An existing output that ``overwrite`` replaces is not
counted as free: it is replaced only once the new output is complete.

Source formats, as qemu-img 7.2 reads them:

- VMDK: monolithicSparse, streamOptimized (compressed grains, read like any
  sparse VMDK), and the multi-file kinds (monolithicFlat,
  twoGbMaxExtentSparse, twoGbMaxExtentFlat: a descriptor naming extent
  files). Every extent is an input: it must lie inside the allowed roots,
  the output may not replace it, and a checksum covers it.
- VHD, fixed or dynamic: the size is read from the footer's current size
  (see :data:`h2k.tools.qemu_img.READ_OPTIONS`), so a disk written by
  Hyper-V, Azure or any other tool converts to exactly its size. A VHD that
  qemu created without ``force_size`` has its size rounded up to a CHS
  geometry, and that rounded size is its size. The result gives the size
  read; ``source.qemu_default_virtual_size_bytes`` is what a plain
  ``qemu-img info -f vpc`` would say, when the two could differ.
- VHDX: qemu refuses to open one whose log was not replayed (the VM was not
  shut down cleanly), since replaying writes the image; such a source is
  refused with ``INVALID_IMAGE`` and left as it is.

Phases reported: ``validation`` (checks, hashing progress, the measured
size), ``conversion`` (qemu-img's progress, one event per whole percent),
``verification``, ``finalize``. Error codes come from
:mod:`h2k.operations.codes`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from h2k.errors import InvalidInput
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
    from_invalid,
    image_stem,
    install,
    invalid_parameter,
    output_path,
    remove,
    stop_if_asked,
    temp_path,
    tool_errors,
)
from h2k.tools import checksum, qemu_img

log = logging.getLogger(__name__)

CONVERSION = "conversion"
VERIFICATION = "verification"

OUTPUT_SUFFIXES: dict[str, str] = {"qcow2": ".qcow2", "raw": ".raw"}
DEFAULT_OUTPUT_FORMAT = "qcow2"
CHECKSUM_FIELD = "image.checksum"
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


@dataclass(frozen=True)
class _Plan:
    source: str
    source_format: str
    # Every file the source reads, in the order a checksum covers them.
    files: list[str]
    # The size as h2k reads the source, and as plain qemu-img info says.
    virtual_size: int
    default_virtual_size: int
    checksum: str | None
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
    # A partial output an earlier run of this job left would count against
    # the free space; it is this job's own, so it goes first.
    temp = temp_path(plan.output, ctx.job_id)
    remove(temp)
    checksum_result = _verify_checksum(ctx, plan)
    required, free = _check_space(ctx, plan)
    try:
        _convert(ctx, plan, temp)
        verification = _verify(ctx, plan, temp)
        install(ctx, temp, plan.output, plan.overwrite)
    finally:
        remove(temp)

    size = os.stat(plan.output)
    source: dict[str, Any] = {
        "path": plan.source,
        "format": plan.source_format,
        "files": plan.files,
    }
    if qemu_img.has_read_options(plan.source_format):
        driver = qemu_img.QEMU_FORMATS[plan.source_format]
        source["read_options"] = dict(qemu_img.READ_OPTIONS[driver])
        source["qemu_default_virtual_size_bytes"] = plan.default_virtual_size
    result = {
        "output_path": plan.output,
        "output_format": plan.output_format,
        "output_size_bytes": size.st_blocks * 512,
        "output_file_size_bytes": size.st_size,
        "virtual_size_bytes": plan.virtual_size,
        "source": source,
        "compressed": plan.compress,
        "checksum": checksum_result,
        "measured_required_bytes": required,
        "free_bytes_before": free,
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
    expected = None
    declared = (ctx.spec.get("image") or {}).get("checksum")
    if declared is not None:
        try:
            expected = checksum.parse(declared, CHECKSUM_FIELD)
        except InvalidInput as exc:
            raise from_invalid(exc, codes.INVALID_PARAMETERS) from exc

    source = check_source(ctx)
    virtual_size = source.virtual_size
    if qemu_img.has_read_options(source.format):
        with tool_errors(VALIDATION, codes.TOOL_FAILED, "qemu-img info"):
            read = qemu_img.source_info(source.path, source.format)
        virtual_size = int(read.get("virtual-size", 0))
    default_name = (
        image_stem(ctx.spec["image"]["path"]) + OUTPUT_SUFFIXES[output_format]
    )
    output = output_path(ctx, default_name, ctx.allowed_roots)
    check_output(output, source.files, overwrite)
    return _Plan(
        source=source.path,
        source_format=source.format,
        files=source.files,
        virtual_size=virtual_size,
        default_virtual_size=source.virtual_size,
        checksum=expected,
        output=output,
        output_format=output_format,
        compress=compress,
        overwrite=overwrite,
        rate_limit=rate_limit,
        deadline=deadline,
    )


def human_size(count: int) -> str:
    """``count`` bytes in binary units, as a person reads a size: ``6.3 MiB``."""
    if abs(count) < 1024:
        return f"{count} bytes"
    value = float(count)
    for unit in _UNITS:
        value /= 1024
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def _sized(count: int) -> str:
    return f"{human_size(count)} ({count} bytes)"


def _verify_checksum(ctx: OperationContext, plan: _Plan) -> dict[str, Any] | None:
    """Hash the source's files and refuse it unless they match ``image.checksum``.

    Runs before anything is written: an image that is not the one the job
    names (a truncated copy, the wrong file) must not be converted.
    """
    if plan.checksum is None:
        return None
    stop_if_asked(ctx, VALIDATION)
    files = plan.files
    what = files[0] if len(files) == 1 else " + ".join(files)
    ctx.report(
        VALIDATION,
        None,
        f"Checking the sha256 of {what}",
        {"files": list(files)},
    )
    last = -1

    def progress(done: int, total: int) -> None:
        nonlocal last
        whole = done * 100 // total if total else 100
        if whole <= last:
            return
        last = whole
        ctx.report(
            VALIDATION,
            None,
            f"Hashed {human_size(done)} of {human_size(total)} ({whole}%)",
            {"bytes_hashed": str(done), "total_bytes": str(total)},
        )

    with tool_errors(VALIDATION, codes.TOOL_FAILED, "hashing the image"):
        actual = checksum.sha256_files(
            files,
            on_progress=progress,
            should_stop=ctx.should_stop,
            timeout=plan.deadline.remaining(VALIDATION),
        )
    expected = f"{checksum.ALGORITHM}:{plan.checksum}"
    found = f"{checksum.ALGORITHM}:{actual}"
    if actual != plan.checksum:
        if len(files) == 1:
            covered = files[0]
        else:
            covered = f"{', '.join(files)} (hashed one after another, in this order)"
        raise fail(
            VALIDATION,
            codes.CHECKSUM_MISMATCH,
            f"{CHECKSUM_FIELD} is {expected} but the sha256 of {covered} is {found}",
            expected=expected,
            actual=found,
            files=list(files),
        )
    ctx.report(VALIDATION, None, f"The image matches {expected}", {"sha256": actual})
    return {
        "algorithm": checksum.ALGORITHM,
        "expected": expected,
        "actual": found,
        "files": list(files),
        "matches": True,
    }


def _free_bytes(directory: str) -> int:
    try:
        stats = os.statvfs(directory)
    except OSError as exc:
        message = f"cannot read the free space of {directory}: {exc.strerror or exc}"
        raise fail(VALIDATION, codes.TOOL_FAILED, message, retryable=True) from exc
    return stats.f_bavail * stats.f_frsize


def _check_space(ctx: OperationContext, plan: _Plan) -> tuple[int, int]:
    """Refuse, before writing, an output its directory has no room for.

    Returns the bytes ``qemu-img measure`` says the output needs and the
    bytes free in its directory.
    """
    stop_if_asked(ctx, VALIDATION)
    with tool_errors(VALIDATION, codes.TOOL_FAILED, "qemu-img measure"):
        measured = qemu_img.measure(
            plan.source,
            plan.source_format,
            plan.output_format,
            should_stop=ctx.should_stop,
            timeout=plan.deadline.remaining(VALIDATION),
        )
    required = measured["required"]
    directory = os.path.dirname(plan.output)
    free = _free_bytes(directory)
    bound = "at most " if plan.compress else ""
    ctx.report(
        VALIDATION,
        None,
        f"The output needs {bound}{human_size(required)}; "
        f"{directory} has {human_size(free)} free",
        {
            "measured_required_bytes": str(required),
            "fully_allocated_bytes": str(measured["fully_allocated"]),
            "free_bytes": str(free),
            "output_directory": directory,
        },
    )
    if required > free:
        raise fail(
            VALIDATION,
            codes.INSUFFICIENT_SPACE,
            f"the {plan.output_format} output needs {bound}{_sized(required)} "
            f"but {directory} has {_sized(free)} free; free "
            f"{human_size(required - free)} or choose another "
            "parameters.output_path",
            measured_required_bytes=required,
            free_bytes=free,
            output_directory=directory,
        )
    return required, free


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
