"""A Linux guest mounted as it mounts itself: its root, then /boot and EFI.

The root filesystem is mounted first; its /etc/fstab says where /boot and
/boot/efi are, and those are mounted as well when they are filesystems of
this disk, so the guest's boot files are read (and repaired) wherever they
live. Each mount is read-only unless its guest path is in ``writable``, so
an operation writes only to the filesystems it has to change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from h2k.errors import OperationError
from h2k.guest import GuestDisk
from h2k.guestos import fstab, osrelease
from h2k.guestos.devices import DeviceIndex, DiskFs
from h2k.guestos.find_root import LINUX_TYPES, UNREADABLE_CODES
from h2k.guestos.tree import GuestTree

log = logging.getLogger(__name__)

ROOT = "/"
BOOT = "/boot"
EFI = "/boot/efi"
EXTRA_MOUNTS = (BOOT, EFI)
_BOOT_MARKERS = ("grub2", "grub", "loader")


@dataclass
class MountedGuest:
    """The guest's tree and what it is made of."""

    tree: GuestTree
    devices: DeviceIndex
    root: DiskFs
    mounted: dict[str, DiskFs]
    release: osrelease.OsRelease | None
    notes: list[str] = field(default_factory=list)

    @property
    def boot(self) -> DiskFs:
        """The filesystem holding /boot: a separate one, or the root."""
        return self.mounted.get(BOOT, self.root)

    @property
    def family(self) -> str | None:
        return None if self.release is None else self.release.family


def _looks_like_boot(disk: GuestDisk, candidate: DiskFs) -> bool:
    with disk.mount(candidate.fs) as mountpoint:
        tree = GuestTree({ROOT: (mountpoint, False)})
        names = tree.listdir("/")
    return any(n in _BOOT_MARKERS or n.startswith("vmlinuz-") for n in names)


def _boot_fallback(
    disk: GuestDisk, devices: DeviceIndex, root: DiskFs
) -> DiskFs | None:
    """The filesystem that looks like /boot when fstab's name for it fails."""
    for candidate in devices.entries:
        if candidate is root or candidate.fs.type not in LINUX_TYPES:
            continue
        try:
            if _looks_like_boot(disk, candidate):
                return candidate
        except OperationError as exc:
            if exc.code not in UNREADABLE_CODES:
                raise
    return None


def fstab_filesystem(
    disk: GuestDisk,
    devices: DeviceIndex,
    root: DiskFs,
    spec: str,
    guest_path: str,
    notes: list[str],
) -> DiskFs | None:
    """The filesystem ``spec``, fstab's name for ``guest_path``, names here.

    For /boot, a name that fails (a device name of the old hypervisor, a
    UUID of a filesystem since recreated) falls back to the filesystem that
    holds boot files. None when nothing of this disk fits; ``notes`` say
    what was guessed or not found.
    """
    target = devices.lookup(spec)
    if target is None and guest_path == BOOT:
        target = _boot_fallback(disk, devices, root)
        if target is not None:
            notes.append(
                f"fstab names {spec} for {BOOT}, which is not on this "
                f"disk; {target.source} holds the boot files"
            )
    if target is None:
        notes.append(f"fstab names {spec} for {guest_path}: not on this disk")
    return target


@contextlib.contextmanager
def mount_guest(
    disk: GuestDisk,
    devices: DeviceIndex,
    root: DiskFs,
    *,
    writable: frozenset[str] = frozenset(),
    checkpoint: Callable[[], None] = lambda: None,
) -> Iterator[MountedGuest]:
    """Mount the guest; yield it; unmount everything on the way out."""
    with contextlib.ExitStack() as stack:
        checkpoint()
        root_dir = stack.enter_context(disk.mount(root.fs, writable=ROOT in writable))
        layout: dict[str, tuple[str, bool]] = {ROOT: (root_dir, ROOT in writable)}
        tree = GuestTree(layout)
        mounted: dict[str, DiskFs] = {}
        notes: list[str] = []
        for guest_path in EXTRA_MOUNTS:
            spec = fstab.mount_spec(tree, guest_path)
            if spec is None:
                continue
            target = fstab_filesystem(disk, devices, root, spec, guest_path, notes)
            if target is None:
                continue
            if target.fs.volume == root.fs.volume:
                continue
            checkpoint()
            try:
                host = stack.enter_context(
                    disk.mount(target.fs, writable=guest_path in writable)
                )
            except OperationError as exc:
                if exc.code not in UNREADABLE_CODES or guest_path in writable:
                    raise
                notes.append(f"{guest_path} ({target.source}) cannot be read: {exc}")
                continue
            layout[guest_path] = (host, guest_path in writable)
            mounted[guest_path] = target
            tree = GuestTree(layout)
        yield MountedGuest(
            tree=tree,
            devices=devices,
            root=root,
            mounted=mounted,
            release=osrelease.read(tree),
            notes=notes,
        )
