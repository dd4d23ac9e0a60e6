"""Schedule an SELinux relabel at a Linux guest's first boot under KVM.

Files written while the guest was offline (by offline_fix, by
initramfs_regenerate) may carry no SELinux label or a wrong one. When the
guest's /etc/selinux/config enables SELinux (``enforcing`` or
``permissive``), ``/.autorelabel`` is created on its root filesystem and
the guest relabels itself at its next boot. A guest without SELinux
(no config, or ``SELINUX=disabled``) is reported as such and left
unchanged: that is a result, not an error.

Phases and parameters are those of offline_fix.
"""

from __future__ import annotations

import logging
from typing import Any

from h2k.guestos import selinux
from h2k.guestos.modify import Step, modify_guest
from h2k.operations.base import OperationContext

log = logging.getLogger(__name__)

STEP = Step("selinux", lambda g: selinux.plan(g.tree))


def run(ctx: OperationContext) -> dict[str, Any]:
    """Schedule the relabel on ``ctx.spec["image"]`` if its guest uses SELinux."""
    outcome = modify_guest(ctx, [STEP])
    (plan,) = outcome.plans
    state = plan.found
    enabled = selinux.enabled(state)
    already = bool(state.get("relabel_scheduled"))
    scheduled = enabled and (already or outcome.applied)
    log.info(
        "job %s: selinux %s, relabel scheduled: %s",
        ctx.job_id,
        state["mode"],
        scheduled,
    )
    report = plan.as_dict(applied=outcome.applied)
    return {
        "guest": outcome.guest,
        "selinux": state["mode"],
        "policy": state.get("policy"),
        "relabel_scheduled": scheduled,
        "already_scheduled": enabled and already,
        "dry_run": outcome.dry_run,
        "applied": outcome.applied,
        "changes": report["changes"],
        "files_changed": report["files_changed"],
        "notes": outcome.notes + report["notes"],
        "output": outcome.output,
    }
