"""Mount and unmount, with the kernel's mount table as the only truth.

Every unmount first asks /proc/self/mounts whether the target is still
mounted, so teardown can run twice, or after a crash, without failing on
what already went. When a normal unmount keeps failing because something
holds the filesystem, a lazy unmount detaches it from the tree so that the
rest of the teardown can go on; the kernel finishes it when the last user
lets go.
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
UNMOUNT_ATTEMPTS = 5
UNMOUNT_RETRY_SECONDS = 0.2
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


def _retrying(argv: list[str], lazy: list[str], target: str, timeout: float) -> None:
    last: ToolError | None = None
    for _ in range(UNMOUNT_ATTEMPTS):
        if mounted_at(target) is None:
            return
        try:
            run_tool(argv, timeout=timeout)
            return
        except ToolError as exc:
            last = exc
            time.sleep(UNMOUNT_RETRY_SECONDS)
    if mounted_at(target) is None:
        return
    log.warning("%s stays busy (%s); unmounting lazily", target, last)
    run_tool(lazy, timeout=timeout)


def unmount(target: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Unmount ``target`` if it is mounted; lazily when it stays busy."""
    target = os.path.abspath(target)
    _retrying(["umount", target], ["umount", "--lazy", target], target, timeout)


def unmount_fuse(mountpoint: str, timeout: float = TIMEOUT_SECONDS) -> None:
    """Unmount a FUSE mount; its server then flushes and exits by itself."""
    mountpoint = os.path.abspath(mountpoint)
    _retrying(
        ["fusermount3", "-u", mountpoint],
        ["fusermount3", "-u", "-z", mountpoint],
        mountpoint,
        timeout,
    )
