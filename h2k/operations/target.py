"""The image a modifying operation changes: never the only copy, by default.

``offline_fix``, ``fs_repair``, ``lvm_repair``, ``boot_repair``,
``selinux_prep`` and ``initramfs_regenerate`` change a guest disk. Unless the
job says ``parameters.in_place: true``, they change a qcow2 overlay whose
backing file is the source: the source is opened read-only and never
written, and a failed fix leaves it as it was. The overlay is built under a
hidden temporary name beside its final one and renamed only when the
operation succeeded. With ``parameters.dry_run: true`` nothing is written at
all: the operation gets the source, read-only, and reports what it would do.

Parameters shared by these operations:

- ``in_place`` (false): change the image itself.
- ``dry_run`` (false): change nothing; report what would change.
- ``output_path``: where the overlay goes; default
  ``<image dir>/<image stem>.<operation>.qcow2``.
- ``overwrite`` (false): replace an existing file at ``output_path``.

:func:`open_guest_disk` opens the image as a guest disk session, as
writable as the target is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from h2k.guest import GuestDisk
from h2k.guest.disk import DEFAULT_TIMEOUT_SECONDS
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import (
    VALIDATION,
    Deadline,
    Source,
    check_output,
    check_source,
    flag,
    image_stem,
    install,
    output_path,
    remove,
    stop_if_asked,
    temp_path,
    tool_errors,
)
from h2k.tools import qemu_img

log = logging.getLogger(__name__)


@dataclass
class WorkTarget:
    """The image to open, and what the job's result says about it."""

    path: str
    # The qemu driver name (vmdk, vpc, qcow2, ...), for GuestDisk.open.
    driver: str
    writable: bool
    source: Source
    dry_run: bool
    in_place: bool
    deadline: Deadline
    # Filled in once the operation succeeded and the output is in place.
    output: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The result's ``output`` entry: where the changes are."""
        if self.dry_run:
            return {"dry_run": True, "path": None, "source_modified": False}
        if self.in_place:
            return {
                "path": self.source.path,
                "format": self.source.format,
                "in_place": True,
                "source_modified": True,
            }
        return {
            "path": self.output,
            "format": "qcow2",
            "backing_file": self.source.path,
            "backing_format": self.source.format,
            "in_place": False,
            "source_modified": False,
        }


@contextmanager
def working_image(ctx: OperationContext) -> Iterator[WorkTarget]:
    """Yield the image the operation may change; keep it only on success.

    The operation must have closed every view of the image (its GuestDisk
    session) before leaving the ``with`` block, so that the overlay is
    complete when it is renamed.
    """
    params = ctx.parameters
    dry_run = flag(params, "dry_run")
    in_place = flag(params, "in_place")
    overwrite = flag(params, "overwrite")
    deadline = Deadline(ctx.spec)
    source = check_source(ctx)
    driver = qemu_img.QEMU_FORMATS[source.format]

    if dry_run or in_place:
        yield WorkTarget(
            path=source.path,
            driver=driver,
            writable=in_place and not dry_run,
            source=source,
            dry_run=dry_run,
            in_place=in_place and not dry_run,
            deadline=deadline,
        )
        return

    operation = ctx.spec["operation"]
    default_name = f"{image_stem(ctx.spec['image']['path'])}.{operation}.qcow2"
    output = output_path(ctx, default_name, ctx.allowed_roots)
    check_output(output, source.files, overwrite)
    temp = temp_path(output, ctx.job_id)
    remove(temp)
    ctx.report(VALIDATION, None, f"Changes will go to the overlay {output}")
    try:
        with tool_errors(VALIDATION, codes.TOOL_FAILED, "qemu-img create"):
            qemu_img.create_overlay(temp, source.path, source.format)
        target = WorkTarget(
            path=temp,
            driver="qcow2",
            writable=True,
            source=source,
            dry_run=False,
            in_place=False,
            deadline=deadline,
        )
        yield target
        install(ctx, temp, output, overwrite)
        target.output = output
    finally:
        remove(temp)


@contextmanager
def open_guest_disk(
    ctx: OperationContext,
    target: WorkTarget,
    phase: str,
    message: str,
    percentage: int | None = None,
) -> Iterator[GuestDisk]:
    """``target`` as a guest disk session, announced by ``message`` in ``phase``.

    Stops first if the job was cancelled; the session's tools run within
    the guest layer's own limit or what is left of the job's, and its
    errors carry ``phase``.
    """
    stop_if_asked(ctx, phase)
    ctx.report(phase, percentage, message)
    with GuestDisk.open(
        target.path,
        target.driver,
        writable=target.writable,
        should_stop=ctx.should_stop,
        timeout=target.deadline.capped(phase, DEFAULT_TIMEOUT_SECONDS),
        phase=phase,
    ) as disk:
        yield disk
