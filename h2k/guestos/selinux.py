"""SELinux in the guest: its mode, and a relabel at the next boot.

Files h2k creates or replaces while the guest is offline may carry no
SELinux label, or a wrong one; a guest that enforces SELinux then refuses
to read them. Creating ``/.autorelabel`` on the root filesystem makes the
guest's own boot (selinux-autorelabel) relabel every file with its policy
and reboot once: the standard way, the one the distributions document.
"""

from __future__ import annotations

from typing import Any

from h2k.guestos import changes, osrelease
from h2k.guestos.changes import FixPlan
from h2k.guestos.tree import GuestTree

CONFIG = "/etc/selinux/config"
AUTORELABEL = "/.autorelabel"
ABSENT = "absent"
DISABLED = "disabled"
ENABLED_MODES = ("enforcing", "permissive")


def describe(tree: GuestTree) -> dict[str, Any]:
    """The configured mode (absent, disabled, permissive, enforcing) and policy."""
    text = tree.read_text(CONFIG)
    if text is None:
        return {
            "mode": ABSENT,
            "policy": None,
            "config": None,
            "relabel_scheduled": tree.lexists(AUTORELABEL),
        }
    fields = osrelease.parse(text)
    mode = fields.get("SELINUX", "").strip().lower() or DISABLED
    return {
        "mode": mode,
        "policy": fields.get("SELINUXTYPE"),
        "config": CONFIG,
        "relabel_scheduled": tree.lexists(AUTORELABEL),
    }


def enabled(state: dict[str, Any]) -> bool:
    return state["mode"] in ENABLED_MODES


def plan(tree: GuestTree) -> FixPlan:
    """Create /.autorelabel when SELinux is enabled and none is scheduled."""
    result = FixPlan("selinux")
    state = describe(tree)
    result.found = state
    if not enabled(state):
        result.applicable = False
        result.notes.append(
            "the guest has no SELinux configuration"
            if state["mode"] == ABSENT
            else f"SELinux is {state['mode']} in the guest"
        )
        return result
    if state["relabel_scheduled"]:
        result.notes.append(f"{AUTORELABEL} already exists")
        return result
    result.changes.append(
        changes.create(
            AUTORELABEL,
            "",
            f"relabel every file at the next boot (SELinux is {state['mode']})",
        )
    )
    return result
