"""Fix a Linux guest offline for its first boot under KVM.

``parameters.fixes`` chooses among (all by default, run in this order):

- ``fstab``: kernel device names in /etc/fstab become ``UUID=``;
- ``bootloader``: the GRUB configuration names the disk's filesystems by
  UUID, device.map goes (the same repair as boot_repair);
- ``vmware_tools``: VMware tools programs, configuration, units and their
  enablement symlinks removed;
- ``network``: configuration pinned to the VMware NIC's MAC address
  unpinned (ifcfg, NetworkManager, netplan, networkd, udev, ifupdown);
- ``initramfs_config``: the initramfs tool told to include virtio drivers.

The changes go to a qcow2 overlay unless ``in_place``; ``dry_run`` reports
them (file, before, after) and writes nothing. A guest that is not Linux
is ``UNSUPPORTED_GUEST``; a disk without a system ``NO_OPERATING_SYSTEM``.

Phases: ``validation``, ``opening``, ``discovery``, ``planning``,
``applying``, ``finalize``.
"""

from __future__ import annotations

import logging
from typing import Any

from h2k.guestos import bootloader, fstab, initramfs_config, network, vmware
from h2k.guestos.modify import Step, modify_guest
from h2k.operations.base import OperationContext
from h2k.operations.common import invalid_parameter
from h2k.schemas import OFFLINE_FIXES

log = logging.getLogger(__name__)

STEPS: dict[str, Step] = {
    "fstab": Step("fstab", lambda g: fstab.plan(g.tree, g.devices)),
    "bootloader": Step(
        "bootloader", lambda g: bootloader.plan(g.tree, g.devices, g.root, g.boot)
    ),
    "vmware_tools": Step("vmware_tools", lambda g: vmware.plan(g.tree)),
    "network": Step("network", lambda g: network.plan(g.tree)),
    "initramfs_config": Step(
        "initramfs_config", lambda g: initramfs_config.plan(g.tree, g.family)
    ),
}


def chosen_fixes(params: dict[str, Any]) -> list[str]:
    """``parameters.fixes`` checked, duplicates dropped, in the run order."""
    fixes = params.get("fixes", list(OFFLINE_FIXES))
    field = "parameters.fixes"
    if not isinstance(fixes, list) or not fixes:
        raise invalid_parameter(field, f"{field} must be a non-empty list")
    unknown = [f for f in fixes if f not in STEPS]
    if unknown:
        raise invalid_parameter(
            field,
            f"{field} names unknown fixes {unknown}; known: {', '.join(OFFLINE_FIXES)}",
        )
    return [name for name in OFFLINE_FIXES if name in fixes]


def run(ctx: OperationContext) -> dict[str, Any]:
    """Apply the chosen fixes to ``ctx.spec["image"]``."""
    fixes = chosen_fixes(ctx.parameters)
    outcome = modify_guest(ctx, [STEPS[name] for name in fixes])
    log.info(
        "job %s: offline_fix %s changed %d paths (applied: %s)",
        ctx.job_id,
        ",".join(fixes),
        len(outcome.files_changed()),
        outcome.applied,
    )
    return {
        "guest": outcome.guest,
        "fixes_requested": fixes,
        "dry_run": outcome.dry_run,
        "applied": outcome.applied,
        "fixes": outcome.fixes(),
        "files_changed": outcome.files_changed(),
        "notes": outcome.notes,
        "output": outcome.output,
    }
