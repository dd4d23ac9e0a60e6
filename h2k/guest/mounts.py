"""Mount and unmount, with the kernel's mount table as the only truth.

Every unmount first asks /proc/self/mounts whether the target is still
mounted, so teardown can run twice, or after a crash, without failing on
what already went. A filesystem that stays busy is not unmounted lazily:
whatever lies beneath it (loop device, FUSE file, qemu-nbd) would be taken
away while something still writes through it, so the unmount fails and the
teardown stops there, recorded for a later :func:`h2k.guest.cleanup_stale`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from h2k.errors import ToolError
from h2k.tools.process import run_tool

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 120.0
UNMOUNT_ATTEMPTS = 6
UNMOUNT_RETRY_SECONDS = 0.25
FUSE_TYPES = ("fuse", "fuseblk")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...]


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mount_table() -> list[MountEntry]:
    """The mounts this process sees, in the order they were made."""
    entries = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4:
                continue
            entries.append(
                MountEntry(
                    source=_unescape(fields[0]),
                    target=_unescape(fields[1]),
                    fstype=fields[2],
                    options=tuple(fields[3].split(",")),
                )
            )
    return entries


def mounted_at(target: str) -> MountEntry | None:
    """The topmost mount at ``target``, None when nothing is mounted there."""
    wanted = os.path.abspath(target)
    found = None
    for entry in mount_table():
        if entry.target == wanted:
            found = entry
    return found


def mounted_under(directory: str) -> list[MountEntry]:
    """Mounts at or below ``directory``, deepest (and latest) first."""
    root = os.path.abspath(directory).rstrip("/")
    inside = [
        entry
        for entry in mount_table()
        if entry.target == root or entry.target.startswith(root + "/")
    ]
    inside.reverse()
    inside.sort(key=lambda entry: entry.target.count("/"), reverse=True)
    return inside


def mount(
    device: str,
    target: str,
    fstype: str,
    options: Sequence[str],
    *,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> None:
    """Mount ``device`` on ``target`` with an explicit type: never probe."""
    argv = ["mount", "-t", fstype]
    if options:
        argv += ["-o", ",".join(options)]
    argv += [device, target]
    run_tool(argv, should_stop=should_stop, timeout=timeout)


def _retrying(argv: list[str], target: str, timeout: float) -> None:
    last: ToolError | None = None
    for _ in range(UNMOUNT_ATTEMPTS):
        if mounted_at(target) is None:
            return
        try:
            run_tool(argv, timeout=timeout)
            log.debug("unmounted %s", target)
            return
        except ToolError as exc:
            log.debug("unmounting %s failed, retrying: %s", target, exc)
            last = exc
            time.sleep(UNMOUNT_RETRY_SECONDS)
    if mounted_at(target) is not None and last is not None:
        raise last


def unmount(target: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Unmount ``target`` if it is mounted; a busy one fails after retries."""
    target = os.path.abspath(target)
    _retrying(["umount", target], target, timeout)


def unmount_fuse(mountpoint: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Unmount a FUSE mount; its server then flushes and exits by itself."""
    mountpoint = os.path.abspath(mountpoint)
    _retrying(["fusermount3", "-u", mountpoint], mountpoint, timeout)
