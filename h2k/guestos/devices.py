"""How a guest names its filesystems, and which of those names survive a move.

A guest refers to its filesystems in fstab and on the kernel command line
by UUID, label, partition UUID, LVM name or kernel device name. Only the
last depends on the hypervisor: the disk a VMware guest knew as /dev/sda
(SCSI) is /dev/vda under KVM's virtio-blk. :class:`DeviceIndex` knows the
disk's partitions, filesystems and logical volumes, says which kind of name
a reference is, what it points to, and what stable name replaces it.

A kernel device name of the first disk (sda, hda, vda, xvda, nvme0n1) is
taken to mean this disk, which is the guest's boot disk; names of other
disks cannot be resolved from this one image and are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from h2k.guest import Filesystem, LogicalVolume, Partition

DEVICE_NAME = "device_name"
UUID = "uuid"
LABEL = "label"
PARTUUID = "partuuid"
PARTLABEL = "partlabel"
LVM = "lvm"
OTHER = "other"
STABLE_KINDS = frozenset({UUID, LABEL, PARTUUID, PARTLABEL, LVM})

_KERNEL_NAME = re.compile(
    r"^/dev/(?:"
    r"(?P<scsi>(?:s|h|v|xv)d)(?P<letters>[a-z]+)(?P<part>\d*)"
    r"|nvme(?P<ctrl>\d+)n(?P<ns>\d+)(?:p(?P<nvme_part>\d+))?"
    r"|cciss/c(?P<cc>\d+)d(?P<cd>\d+)(?:p(?P<cciss_part>\d+))?"
    r")$"
)
_OTHER_DEVICE = re.compile(r"^/dev/(?:sr\d+|cdrom|fd\d+|loop\d+|md\d+|dm-\d+)$")
_BY = {
    "/dev/disk/by-uuid/": UUID,
    "/dev/disk/by-label/": LABEL,
    "/dev/disk/by-partuuid/": PARTUUID,
    "/dev/disk/by-partlabel/": PARTLABEL,
}
_TAGS = {"UUID": UUID, "LABEL": LABEL, "PARTUUID": PARTUUID, "PARTLABEL": PARTLABEL}


@dataclass(frozen=True)
class KernelName:
    """A kernel device name: disk index (0 = first) and partition (None = disk)."""

    disk: int
    partition: int | None


def kernel_name(spec: str) -> KernelName | None:
    """Read ``/dev/sda2``, ``/dev/vdb``, ``/dev/nvme0n1p3``; None if not one."""
    match = _KERNEL_NAME.match(spec)
    if match is None:
        return None
    if match.group("scsi"):
        disk = 0
        for letter in match.group("letters"):
            disk = disk * 26 + (ord(letter) - ord("a") + 1)
        part = match.group("part")
        return KernelName(disk - 1, int(part) if part else None)
    if match.group("ctrl") is not None:
        part = match.group("nvme_part")
        disk = int(match.group("ctrl")) + int(match.group("ns")) - 1
        return KernelName(disk, int(part) if part else None)
    part = match.group("cciss_part")
    return KernelName(int(match.group("cd")), int(part) if part else None)


def is_device_name(spec: str) -> bool:
    """A kernel name that changes with the disk's bus (sda -> vda)."""
    return kernel_name(spec) is not None


def _unescape_dm(name: str) -> list[tuple[str, str]]:
    """``vg-lv`` (dashes in names doubled) -> [(vg, lv)]."""
    split = re.split(r"(?<!-)-(?!-)", name)
    if len(split) != 2:
        return []
    vg, lv = split
    return [(vg.replace("--", "-"), lv.replace("--", "-"))]


@dataclass(frozen=True)
class DiskFs:
    """A filesystem (or swap) of the disk, and where it lies."""

    fs: Filesystem
    partition: Partition | None
    lv: LogicalVolume | None

    @property
    def uuid(self) -> str | None:
        return self.fs.uuid

    @property
    def source(self) -> str:
        return self.fs.volume.source

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.fs.volume.source,
            "type": self.fs.type,
            "uuid": self.fs.uuid,
            "label": self.fs.label,
            "partition": None if self.partition is None else self.partition.number,
            "logical_volume": None if self.lv is None else self.lv.path,
        }


class DeviceIndex:
    """The disk's filesystems, found by any name the guest may use."""

    def __init__(
        self,
        filesystems: Sequence[Filesystem],
        partitions: Sequence[Partition],
        logical_volumes: Sequence[LogicalVolume],
    ):
        by_offset = {p.volume.offset: p for p in partitions}
        lv_by_offset = {
            lv.volume.offset: lv for lv in logical_volumes if lv.volume is not None
        }
        self.entries: list[DiskFs] = []
        for fs in filesystems:
            partition = None
            lv = None
            if fs.volume.source.startswith("partition "):
                partition = by_offset.get(fs.volume.offset)
            elif fs.volume.source.startswith("lvm "):
                lv = lv_by_offset.get(fs.volume.offset)
            self.entries.append(DiskFs(fs, partition, lv))
        self.partitioned = bool(partitions)

    def by_uuid(self, uuid: str) -> DiskFs | None:
        wanted = uuid.lower()
        for entry in self.entries:
            if entry.fs.uuid and entry.fs.uuid.lower() == wanted:
                return entry
        return None

    def swaps(self) -> list[DiskFs]:
        return [e for e in self.entries if e.fs.type == "swap"]

    def of(self, fs: Filesystem) -> DiskFs | None:
        for entry in self.entries:
            if entry.fs.volume == fs.volume:
                return entry
        return None

    def classify(self, spec: str) -> str:
        """The kind of reference ``spec`` is (``device_name``, ``uuid``, ...)."""
        tag, sep, _ = spec.partition("=")
        if sep and tag.upper() in _TAGS:
            return _TAGS[tag.upper()]
        for prefix, kind in _BY.items():
            if spec.startswith(prefix):
                return kind
        if spec.startswith("/dev/mapper/") or self._lv_path(spec) is not None:
            return LVM
        if is_device_name(spec):
            return DEVICE_NAME
        return OTHER

    def _lv_path(self, spec: str) -> tuple[str, str] | None:
        parts = spec.split("/")
        if len(parts) == 4 and parts[:2] == ["", "dev"]:
            vg, lv = parts[2], parts[3]
            if any(
                e.lv and (e.lv.vg_name, e.lv.name) == (vg, lv) for e in self.entries
            ):
                return vg, lv
        return None

    def lookup(self, spec: str) -> DiskFs | None:
        """What ``spec`` names on this disk; None if it names nothing here."""
        kind = self.classify(spec)
        value = spec.partition("=")[2] if "=" in spec else spec
        for prefix in _BY:
            if spec.startswith(prefix):
                value = spec[len(prefix) :]
        value = value.strip("\"'")
        if kind == UUID:
            return self.by_uuid(value)
        if kind == LABEL:
            return next((e for e in self.entries if e.fs.label == value), None)
        if kind == PARTUUID:
            return next(
                (
                    e
                    for e in self.entries
                    if e.partition
                    and e.partition.uuid
                    and e.partition.uuid.lower() == value.lower()
                ),
                None,
            )
        if kind == PARTLABEL:
            return next(
                (e for e in self.entries if e.partition and e.partition.name == value),
                None,
            )
        if kind == LVM:
            return self._lookup_lv(spec)
        if kind == DEVICE_NAME:
            return self._lookup_kernel_name(spec)
        return None

    def _lookup_lv(self, spec: str) -> DiskFs | None:
        if spec.startswith("/dev/mapper/"):
            names = _unescape_dm(spec.removeprefix("/dev/mapper/"))
        else:
            found = self._lv_path(spec)
            names = [found] if found else []
        for vg, name in names:
            for entry in self.entries:
                if entry.lv and (entry.lv.vg_name, entry.lv.name) == (vg, name):
                    return entry
        return None

    def _lookup_kernel_name(self, spec: str) -> DiskFs | None:
        name = kernel_name(spec)
        if name is None or name.disk != 0:
            return None
        if name.partition is None:
            if self.partitioned:
                return None
            return next((e for e in self.entries if e.source == "disk"), None)
        return next(
            (
                e
                for e in self.entries
                if e.partition and e.partition.number == name.partition
            ),
            None,
        )

    def stable_name(self, spec: str) -> str | None:
        """``UUID=...`` for a device name that resolves to a filesystem with a
        UUID; None when ``spec`` is already stable or cannot be resolved."""
        if self.classify(spec) != DEVICE_NAME:
            return None
        found = self.lookup(spec)
        if found is None or not found.uuid:
            return None
        return f"UUID={found.uuid}"
