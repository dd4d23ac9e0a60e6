"""Inspect a guest disk: what it is made of, what it holds, what a move needs.

Read-only through and through: the source is opened read-only (qemu-nbd
``--read-only``, read-only loop devices, mounts without journal replay), no
overlay is made, and the image's bytes are the same afterwards.

The result has the image's facts (qemu-img info), the partition table, the
filesystems (type, label, UUID), the LVM layout, and for the guest's root
(found by its /etc/os-release; /boot and /boot/efi mounted as its fstab
says): the OS family, distribution, version, hostname, kernels, boot
loader, fstab, network configuration (MAC pinning flagged), VMware tools,
SELinux, the initramfs tool and its virtio configuration, and
``changes_needed``: what offline_fix, boot_repair, selinux_prep and
initramfs_regenerate would change, worked out by the same code those
operations run. A disk whose root is not found is reported with OS family
``unknown`` (``windows`` when a Windows system volume could be read); a
disk with no filesystem at all is ``NO_OPERATING_SYSTEM``.

Phases: ``validation``, ``image``, ``opening``, ``discovery``, ``guest``,
``finalize``.
"""

from __future__ import annotations

import logging
from typing import Any

from h2k.guest import Filesystem, GuestDisk
from h2k.guestos import (
    bootloader,
    fstab,
    initramfs_config,
    kernels,
    network,
    osrelease,
    parttypes,
    selinux,
    vmware,
)
from h2k.guestos.access import (
    FINALIZE,
    VALIDATION,
    DiskFacts,
    Progress,
    discover,
    open_disk,
)
from h2k.guestos.changes import FixPlan
from h2k.guestos.find_root import LINUX, WINDOWS
from h2k.guestos.modify import guest_facts
from h2k.guestos.mounted import MountedGuest, mount_guest
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import Deadline, check_source, fail
from h2k.tools import qemu_img

log = logging.getLogger(__name__)

IMAGE = "image"
GUEST = "guest"

REASONS = {
    "fstab": "/etc/fstab names filesystems by kernel device name, which changes "
    "when the disk moves to virtio (sda -> vda)",
    "bootloader": "the boot configuration names filesystems by device name or by "
    "a UUID that is not on this disk, or keeps a device.map",
    "vmware_tools": "VMware tools are installed and enabled; under KVM they "
    "have no host to talk to",
    "network": "network configuration is pinned to the VMware NIC's MAC "
    "address, which the KVM NIC will not have",
    "initramfs_config": "the initramfs configuration does not include the virtio "
    "drivers the KVM disk and NIC need",
}


def run(ctx: OperationContext) -> dict[str, Any]:
    """Report on ``ctx.spec["image"]`` without changing a byte of it."""
    progress = Progress(ctx, Deadline(ctx.spec))
    progress.step(VALIDATION, 0, "Checking the image")
    with progress.errors():
        source = check_source(ctx)
        progress.step(IMAGE, 5, "Reading the image's header with qemu-img info")
        info = qemu_img.info(source.path, source.format)
        driver = qemu_img.QEMU_FORMATS[source.format]
        with open_disk(progress, source.path, driver, writable=False) as disk:
            facts = discover(disk, progress)
            if not any(fs.usage == "filesystem" for fs in facts.filesystems):
                raise fail(
                    progress.phase,
                    codes.NO_OPERATING_SYSTEM,
                    f"{source.path} holds no filesystem at all",
                    signatures=[_filesystem(fs) for fs in facts.filesystems],
                    partition_table=_table(facts),
                )
            progress.step(GUEST, 40, "Looking into the guest")
            guest = _guest(disk, facts, progress)
        progress.step(
            FINALIZE, 100, "Inspection finished", {"os": guest["os"]["family"]}
        )
    log.info("job %s: inspected %s: %s", ctx.job_id, source.path, guest["os"]["family"])
    return {
        "image": _image(source.path, source.format, info),
        "partition_table": _table(facts),
        "filesystems": [_filesystem(fs) for fs in facts.filesystems],
        "lvm": _lvm(facts),
        **guest,
    }


def _image(path: str, fmt: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": path,
        "format": fmt,
        "virtual_size_bytes": info.get("virtual-size"),
        "actual_size_bytes": info.get("actual-size"),
        "dirty": info.get("dirty-flag", False),
        "backing_file": info.get("backing-filename"),
        "format_specific": info.get("format-specific"),
    }


def _filesystem(fs: Filesystem) -> dict[str, Any]:
    return {
        "source": fs.volume.source,
        "offset_bytes": fs.volume.offset,
        "size_bytes": fs.volume.size,
        "type": fs.type,
        "usage": fs.usage,
        "label": fs.label,
        "uuid": fs.uuid,
        "version": fs.version,
    }


def _table(facts: DiskFacts) -> dict[str, Any] | None:
    table = facts.table
    if table is None:
        return None
    on_volume = {fs.volume.offset: fs for fs in facts.filesystems}
    partitions = []
    for p in table.partitions:
        fs = on_volume.get(p.start) if p.volume.source.startswith("partition") else None
        partitions.append(
            {
                "number": p.number,
                "start_bytes": p.start,
                "size_bytes": p.size,
                "type": p.type,
                "type_name": parttypes.name(table.label, p.type),
                "uuid": p.uuid,
                "name": p.name,
                "bootable": p.bootable,
                "filesystem": None
                if fs is None or fs.volume.size != p.size
                else {"type": fs.type, "uuid": fs.uuid, "label": fs.label},
            }
        )
    return {
        "label": table.label,
        "id": table.id,
        "sector_size": table.sector_size,
        "partitions": partitions,
    }


def _lvm(facts: DiskFacts) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for pv in facts.physical_volumes:
        if pv.vg_name:
            group = groups.setdefault(
                pv.vg_name,
                {
                    "name": pv.vg_name,
                    "uuid": pv.vg_uuid,
                    "extent_size_bytes": pv.extent_size,
                    "physical_volumes": [],
                    "logical_volumes": [],
                },
            )
            group["physical_volumes"].append(pv.volume.source)
    for lv in facts.logical_volumes:
        if lv.vg_name in groups:
            groups[lv.vg_name]["logical_volumes"].append(lv.name)
    return {
        "physical_volumes": [
            {
                "source": pv.volume.source,
                "uuid": pv.uuid,
                "vg_name": pv.vg_name or None,
                "pe_start_bytes": pv.pe_start,
            }
            for pv in facts.physical_volumes
        ],
        "volume_groups": list(groups.values()),
        "logical_volumes": [
            {
                "vg_name": lv.vg_name,
                "name": lv.name,
                "path": lv.path,
                "uuid": lv.uuid,
                "size_bytes": lv.size,
                "segtype": lv.segtype,
                "linear": lv.segtype == "linear",
                "mountable": lv.volume is not None,
                "offset_bytes": None if lv.volume is None else lv.volume.offset,
                "reason": lv.reason,
            }
            for lv in facts.logical_volumes
        ],
    }


def _guest(disk: GuestDisk, facts: DiskFacts, progress: Progress) -> dict[str, Any]:
    """The ``os`` section and, for Linux, everything read from the root."""
    search = facts.search
    empty: dict[str, Any] = {
        "kernels": [],
        "bootloader": None,
        "fstab": None,
        "network": None,
        "vmware_tools": None,
        "selinux": None,
        "initramfs": None,
        "changes_needed": [],
        "filesystems_checked": search.checked,
    }
    root = facts.root
    if search.family == WINDOWS and root is not None:
        os_facts = {
            "family": WINDOWS,
            "root": root.describe(),
            "notes": [
                "Windows was recognised by its Windows/System32 directory; "
                "its version is not read"
            ],
        }
        return {"os": os_facts, **empty}
    if search.family != LINUX or root is None:
        return {"os": {"family": "unknown", "reason": search.reason()}, **empty}
    with mount_guest(
        disk, facts.devices, root, checkpoint=progress.checkpoint
    ) as guest:
        progress.step(GUEST, 60, "Reading the guest's configuration")
        return {"os": _os(guest), **_linux_sections(guest, search.checked)}


def _os(guest: MountedGuest) -> dict[str, Any]:
    facts = guest_facts(guest)
    facts["hostname"] = osrelease.hostname(guest.tree)
    facts["efi"] = (
        None
        if "/boot/efi" not in guest.mounted
        else guest.mounted["/boot/efi"].describe()
    )
    facts["notes"] = guest.notes
    return facts


def _linux_sections(
    guest: MountedGuest, checked: list[dict[str, Any]]
) -> dict[str, Any]:
    tree = guest.tree
    plans = {
        "fstab": fstab.plan(tree, guest.devices),
        "bootloader": bootloader.plan(tree, guest.devices, guest.root, guest.boot),
        "vmware_tools": vmware.plan(tree),
        "network": network.plan(tree),
        "initramfs_config": initramfs_config.plan(tree, guest.family),
    }
    selinux_state = selinux.describe(tree)
    installed = kernels.find(tree)
    initramfs = initramfs_config.describe(tree, guest.family)
    return {
        "kernels": installed,
        "kernel_module_versions": kernels.module_versions(tree),
        "bootloader": bootloader.describe(tree, guest.devices, guest.boot),
        "fstab": fstab.describe(tree, guest.devices),
        "network": network.describe(tree),
        "vmware_tools": vmware.describe(tree),
        "selinux": selinux_state,
        "initramfs": initramfs,
        "changes_needed": _changes_needed(plans, selinux_state, installed),
        "filesystems_checked": checked,
    }


def _changes_needed(
    plans: dict[str, FixPlan],
    selinux_state: dict[str, Any],
    installed: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    needed = []
    for name, plan in plans.items():
        if not plan.changes:
            continue
        needed.append(
            {
                "fix": name,
                "operation": "offline_fix",
                "also_by": ["boot_repair"] if name == "bootloader" else [],
                "reason": REASONS[name],
                "files": [c.path for c in plan.changes],
                "changes": [c.summary for c in plan.changes],
            }
        )
    if plans["initramfs_config"].changes:
        images = [k["initramfs"] for k in installed if k["initramfs"]]
        needed.append(
            {
                "fix": "initramfs_regenerate",
                "operation": "initramfs_regenerate",
                "also_by": [],
                "reason": "the initramfs images were built without the virtio "
                "drivers; rebuild them once the configuration names them",
                "files": images,
                "changes": [],
            }
        )
    if selinux.enabled(selinux_state) and not selinux_state["relabel_scheduled"]:
        needed.append(
            {
                "fix": "selinux_prep",
                "operation": "selinux_prep",
                "also_by": [],
                "reason": f"SELinux is {selinux_state['mode']}: files changed "
                "offline must be relabelled at the first boot",
                "files": [selinux.AUTORELABEL],
                "changes": [],
            }
        )
    return needed
