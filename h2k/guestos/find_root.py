"""Which filesystem of a disk is the guest's root, and what system it holds.

Every filesystem the host can mount is mounted read-only in turn (no
journal replay: nothing is written) and looked at: a Linux root has
/etc/os-release (or an older release file), a Windows system volume has
Windows/System32. A filesystem the host cannot mount (NTFS when the kernel
has no ntfs3 driver, say) is reported as unreadable with the reason, never
guessed at.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from h2k.errors import OperationError
from h2k.guest import Filesystem, GuestDisk
from h2k.guest import codes as guest_codes
from h2k.guestos import osrelease
from h2k.guestos.tree import GuestTree

log = logging.getLogger(__name__)

LINUX = "linux"
WINDOWS = "windows"
UNKNOWN = "unknown"
LINUX_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs"})
WINDOWS_TYPES = frozenset({"ntfs", "vfat", "exfat"})
# A filesystem h2k cannot mount is reported, not an error, while searching.
UNREADABLE_CODES = frozenset(
    {guest_codes.MOUNT_FAILED, guest_codes.UNSUPPORTED_FILESYSTEM}
)


@dataclass
class RootSearch:
    """The outcome: the family, the root found, and what each filesystem held."""

    family: str = UNKNOWN
    root: Filesystem | None = None
    checked: list[dict[str, Any]] = field(default_factory=list)

    @property
    def unreadable(self) -> list[dict[str, Any]]:
        return [c for c in self.checked if c["found"] == "unreadable"]

    def reason(self) -> str:
        """Why no Linux root was found, for a person."""
        if self.family == WINDOWS:
            return "the disk holds Windows"
        if not self.checked:
            return "the disk holds no filesystem h2k can look into"
        unreadable = self.unreadable
        text = "no filesystem on the disk holds a Linux or Windows system"
        if unreadable:
            names = ", ".join(f"{c['source']} ({c['type']})" for c in unreadable)
            text += f"; these could not be read: {names}"
        return text


def _has_windows(tree: GuestTree) -> bool:
    top = {name.lower(): name for name in tree.listdir("/")}
    if "windows" not in top:
        return False
    inner = {name.lower() for name in tree.listdir(f"/{top['windows']}")}
    return "system32" in inner


def _look(tree: GuestTree, fs_type: str) -> tuple[str, dict[str, Any]]:
    if fs_type in LINUX_TYPES:
        release = osrelease.read(tree)
        if release is not None:
            return LINUX, {
                "os_release": release.path,
                "has_fstab": tree.is_file("/etc/fstab"),
            }
    elif _has_windows(tree):
        return WINDOWS, {}
    return "nothing", {}


def find_root(
    disk: GuestDisk,
    filesystems: list[Filesystem],
    checkpoint: Callable[[], None],
) -> RootSearch:
    """Search ``filesystems`` of ``disk``; ``checkpoint`` runs before each mount."""
    search = RootSearch()
    linux: list[tuple[Filesystem, bool]] = []
    windows: list[Filesystem] = []
    for fs in filesystems:
        if fs.usage != "filesystem":
            continue
        if fs.type not in LINUX_TYPES | WINDOWS_TYPES:
            search.checked.append(_entry(fs, "unreadable", f"{fs.type} is not mounted"))
            continue
        checkpoint()
        try:
            with disk.mount(fs) as mountpoint:
                found, details = _look(GuestTree({"/": (mountpoint, False)}), fs.type)
        except OperationError as exc:
            if exc.code not in UNREADABLE_CODES:
                raise
            log.info("cannot look into %s: %s", fs.volume.source, exc.message)
            search.checked.append(_entry(fs, "unreadable", exc.message))
            continue
        search.checked.append(_entry(fs, found, None, **details))
        if found == LINUX:
            linux.append((fs, bool(details.get("has_fstab"))))
        elif found == WINDOWS:
            windows.append(fs)
    if linux:
        # A root with an fstab before a stray copy of /etc without one.
        linux.sort(key=lambda item: not item[1])
        search.family, search.root = LINUX, linux[0][0]
    elif windows:
        search.family, search.root = WINDOWS, windows[0]
    return search


def _entry(
    fs: Filesystem, found: str, reason: str | None, **details: Any
) -> dict[str, Any]:
    entry = {
        "source": fs.volume.source,
        "type": fs.type,
        "uuid": fs.uuid,
        "label": fs.label,
        "found": found,
    }
    if reason:
        entry["reason"] = reason
    entry.update(details)
    return entry
