"""Loop devices over a byte range of a file: how a volume becomes a block device.

A loop device with ``--offset`` and ``--sizelimit`` exposes one partition or
one linear logical volume of the raw view, which is all mount and the LVM
tools need; neither the kernel nbd driver nor device-mapper is involved.
Loop device names are reused as soon as they are free, so a device is only
detached while it is still backed by the file it was attached to.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from h2k.tools.process import run_tool

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 60.0
_DELETED = " (deleted)"


@dataclass(frozen=True)
class LoopInfo:
    device: str
    backing: str
    offset: int
    sizelimit: int
    read_only: bool


def _backing(name: str | None) -> str:
    name = name or ""
    return name[: -len(_DELETED)] if name.endswith(_DELETED) else name


def list_loops(timeout: float = TIMEOUT_SECONDS) -> list[LoopInfo]:
    """Every attached loop device of the host, from ``losetup --json``."""
    result = run_tool(["losetup", "--list", "--json"], timeout=timeout)
    if not result.stdout.strip():
        return []
    rows = json.loads(result.stdout).get("loopdevices", [])
    return [
        LoopInfo(
            device=row["name"],
            backing=_backing(row.get("back-file")),
            offset=int(row.get("offset") or 0),
            sizelimit=int(row.get("sizelimit") or 0),
            read_only=bool(row.get("ro")),
        )
        for row in rows
    ]


def attach(
    backing: str,
    *,
    offset: int = 0,
    size: int | None = None,
    read_only: bool,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> str:
    """Attach a free loop device to ``size`` bytes at ``offset`` of ``backing``.

    Direct I/O keeps a second copy of the guest's pages out of the page cache
    of a FUSE-backed file; the kernel quietly falls back to buffered I/O when
    the file cannot do direct I/O.
    """
    argv = ["losetup", "--find", "--show", "--direct-io=on", "--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    if read_only:
        argv.append("--read-only")
    argv.append(os.path.abspath(backing))
    result = run_tool(argv, should_stop=should_stop, timeout=timeout)
    device = result.stdout.strip()
    log.debug("attached %s to %s at %s", device, backing, offset)
    return device


def detach(device: str, backing: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Detach ``device`` if it is still backed by ``backing``.

    A device that is already gone, or that now serves another file, is left
    alone. A device still in use is detached by the kernel when its last
    user closes it.
    """
    wanted = os.path.abspath(backing)
    for loop in list_loops(timeout):
        if loop.device == device and loop.backing == wanted:
            run_tool(["losetup", "--detach", device], timeout=timeout)
            log.debug("detached %s from %s", device, backing)
            return
    log.debug("%s no longer backed by %s; nothing to detach", device, backing)


def backed_under(directory: str, timeout: float = TIMEOUT_SECONDS) -> list[LoopInfo]:
    """Loop devices whose backing file lies inside ``directory``."""
    prefix = os.path.abspath(directory).rstrip("/") + "/"
    return [loop for loop in list_loops(timeout) if loop.backing.startswith(prefix)]
