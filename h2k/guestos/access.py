"""How an operation reaches a guest: phases, the disk session, the root.

The guest operations (inspect, offline_fix, boot_repair, selinux_prep) all
open a disk, read its layout, find the guest's root and mount it. This
module does those steps the same way for each, and keeps the operation's
promises while doing them: every step reports a progress event, checks for
cancellation first, runs its tools within the job's time limit, and turns a
failing tool or file operation into an :class:`OperationError` that names
the phase it failed in. initramfs_regenerate, which reports its own
progress, finds the root with the same :func:`read_layout`,
:func:`find_root.find_root` and :func:`require_linux`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from h2k.errors import OperationError, ToolError
from h2k.guest import (
    Filesystem,
    GuestDisk,
    LogicalVolume,
    PartitionTable,
    PhysicalVolume,
)
from h2k.guestos import find_root
from h2k.guestos.devices import DeviceIndex, DiskFs
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import Deadline, fail, stop_if_asked, tool_failure

log = logging.getLogger(__name__)

VALIDATION = "validation"
OPENING = "opening"
DISCOVERY = "discovery"
FINALIZE = "finalize"
# The guest layer's errors carry this phase until they are given the real one.
GUEST_PHASE = "guest"
LVM_MEMBER = "LVM2_member"
MAX_TOOL_SECONDS = 600.0


class Progress:
    """An operation's current phase, its events and its error mapping."""

    def __init__(self, ctx: OperationContext, deadline: Deadline):
        self.ctx = ctx
        self.deadline = deadline
        self.phase = VALIDATION

    def step(
        self,
        phase: str,
        percentage: int | None,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Enter ``phase`` (stopping first if the job was cancelled) and report."""
        self.phase = phase
        stop_if_asked(self.ctx, phase)
        self.ctx.report(phase, percentage, message, details or {})

    def checkpoint(self) -> None:
        stop_if_asked(self.ctx, self.phase)

    def timeout(self) -> float:
        """Seconds each tool may run: the time left, at most ten minutes."""
        return self.deadline.capped(self.phase, MAX_TOOL_SECONDS)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Map what fails inside onto an :class:`OperationError` of this phase."""
        try:
            yield
        except OperationError as exc:
            if exc.phase == GUEST_PHASE:
                exc.phase = self.phase
            raise
        except ToolError as exc:
            raise tool_failure(self.phase, codes.TOOL_FAILED, exc.tool, exc) from exc
        except OSError as exc:
            raise fail(
                self.phase,
                codes.TOOL_FAILED,
                f"a file operation in the guest failed: {exc}",
            ) from exc


@contextlib.contextmanager
def open_disk(
    progress: Progress,
    path: str,
    driver: str,
    *,
    writable: bool,
    label: str | None = None,
) -> Iterator[GuestDisk]:
    """The guest disk session, torn down whatever happens inside.

    ``label`` names the image for people (an overlay's temporary name says
    little); the path by default.
    """
    progress.step(
        OPENING,
        None,
        f"Opening {label or path} {'read-write' if writable else 'read-only'}",
        {"writable": writable},
    )
    with GuestDisk.open(
        path,
        driver,
        writable=writable,
        should_stop=progress.ctx.should_stop,
        timeout=progress.timeout(),
        phase=GUEST_PHASE,
    ) as disk:
        yield disk


@dataclass
class DiskFacts:
    """What the disk is made of, and where the guest's root is."""

    table: PartitionTable | None
    filesystems: list[Filesystem]
    physical_volumes: list[PhysicalVolume]
    logical_volumes: list[LogicalVolume]
    devices: DeviceIndex
    search: find_root.RootSearch

    @property
    def root(self) -> DiskFs | None:
        if self.search.root is None:
            return None
        return self.devices.of(self.search.root)


def read_layout(disk: GuestDisk, checkpoint: Callable[[], None]) -> DiskFacts:
    """The partition table, filesystems and LVM; the root not searched for yet.

    ``checkpoint`` runs before the LVM tools do; :func:`find_root.find_root`
    fills in ``search``.
    """
    table = disk.partition_table()
    filesystems = disk.filesystems()
    pvs: list[PhysicalVolume] = []
    lvs: list[LogicalVolume] = []
    if any(fs.type == LVM_MEMBER for fs in filesystems):
        checkpoint()
        pvs = disk.physical_volumes()
        lvs = disk.logical_volumes()
    devices = DeviceIndex(
        filesystems, [] if table is None else list(table.partitions), lvs
    )
    return DiskFacts(table, filesystems, pvs, lvs, devices, find_root.RootSearch())


def discover(disk: GuestDisk, progress: Progress, percentage: int = 10) -> DiskFacts:
    """Read the partition table, filesystems and LVM, then find the root."""
    progress.step(DISCOVERY, percentage, "Reading the partition table and filesystems")
    facts = read_layout(disk, progress.checkpoint)
    progress.step(
        DISCOVERY,
        percentage + 10,
        f"Found {len(facts.filesystems)} signatures; looking for the guest's root",
        {
            "filesystems": len(facts.filesystems),
            "logical_volumes": len(facts.logical_volumes),
        },
    )
    facts.search = find_root.find_root(disk, facts.filesystems, progress.checkpoint)
    return facts


def require_linux(facts: DiskFacts, phase: str) -> DiskFs:
    """The Linux root, or the error a guest-changing operation stops with."""
    root = facts.root
    if facts.search.family == find_root.LINUX and root is not None:
        return root
    if facts.search.family == find_root.WINDOWS:
        raise fail(
            phase,
            codes.UNSUPPORTED_GUEST,
            "the disk holds Windows; this operation changes Linux guests only",
            checked=facts.search.checked,
        )
    raise fail(
        phase,
        codes.NO_OPERATING_SYSTEM,
        facts.search.reason(),
        checked=facts.search.checked,
    )
