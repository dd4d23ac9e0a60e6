"""Make a Linux guest's GRUB configuration match the disk it is on now.

Kernel arguments (``root=``, ``resume=``) in grub.cfg, grubenv, BLS
entries, /etc/default/grub and /etc/kernel/cmdline that name a device
(``/dev/sda2``) become ``UUID=``; those naming a UUID that is on no
filesystem of the disk are pointed at the root (or the only swap);
``search --fs-uuid`` lines that find nothing are pointed at the filesystem
holding /boot; device.map is removed. The implementation is the one of
offline_fix's ``bootloader`` fix (:mod:`h2k.guestos.bootloader`).

No GRUB configuration at all is ``NO_BOOTLOADER``; nothing is written then.
Phases and parameters are those of offline_fix.
"""

from __future__ import annotations

import logging
from typing import Any

from h2k.guestos import bootloader
from h2k.guestos.changes import FixPlan
from h2k.guestos.modify import PLANNING, Step, modify_guest
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import fail

log = logging.getLogger(__name__)

STEP = Step("bootloader", lambda g: bootloader.plan(g.tree, g.devices, g.root, g.boot))


def _require_grub(plans: list[FixPlan]) -> None:
    (plan,) = plans
    if not plan.applicable:
        raise fail(
            PLANNING,
            codes.NO_BOOTLOADER,
            "no GRUB configuration was found in the guest "
            "(grub.cfg, grubenv, menu.lst or /etc/default/grub)",
            loaders=plan.found.get("loaders", []),
        )


def run(ctx: OperationContext) -> dict[str, Any]:
    """Repair the boot configuration of ``ctx.spec["image"]``."""
    outcome = modify_guest(ctx, [STEP], check=_require_grub)
    (plan,) = outcome.plans
    log.info("job %s: boot_repair changed %d files", ctx.job_id, len(plan.changes))
    report = plan.as_dict(applied=outcome.applied)
    return {
        "guest": outcome.guest,
        "dry_run": outcome.dry_run,
        "applied": outcome.applied,
        "loaders": plan.found.get("loaders", []),
        "config_files": plan.found.get("config_files", []),
        "status": report["status"],
        "changes": report["changes"],
        "files_changed": report["files_changed"],
        "notes": outcome.notes + report["notes"],
        "output": outcome.output,
    }
