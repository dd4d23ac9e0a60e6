"""The one way the guest-changing operations change a guest.

offline_fix, boot_repair and selinux_prep differ only in their fixes. The
rest is shared and done here:

1. the image to change comes from :func:`h2k.operations.target.working_image`
   (an overlay by default, the image itself with ``in_place``, the source
   read-only with ``dry_run``);
2. the disk is opened, its root found (not Linux: ``UNSUPPORTED_GUEST``; no
   system: ``NO_OPERATING_SYSTEM``);
3. the guest is mounted read-only and every fix works out its changes;
4. a dry run, or a guest that needs nothing, stops there: nothing was
   mounted writable, nothing written;
5. otherwise only the filesystems that have changes are mounted writable,
   each fix works out its changes again on what is now mounted (a
   read-only mount does not replay the journal, a writable one does, so the
   first view may be older) and applies them, in order;
6. the session is closed before the overlay is put in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from h2k.guestos import changes
from h2k.guestos.access import (
    FINALIZE,
    VALIDATION,
    Progress,
    discover,
    open_disk,
    require_linux,
)
from h2k.guestos.changes import FixPlan
from h2k.guestos.mounted import MountedGuest, mount_guest
from h2k.operations.base import OperationContext
from h2k.operations.common import Deadline
from h2k.operations.target import WorkTarget, working_image

log = logging.getLogger(__name__)

PLANNING = "planning"
APPLYING = "applying"


@dataclass(frozen=True)
class Step:
    """One fix: its name and the function that plans it on a mounted guest."""

    name: str
    plan: Callable[[MountedGuest], FixPlan]


@dataclass
class Outcome:
    """What was found and done, for the operation's result."""

    guest: dict[str, Any]
    plans: list[FixPlan]
    applied: bool
    dry_run: bool
    output: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def files_changed(self) -> list[str]:
        return [c.path for p in self.plans for c in p.changes]

    def fixes(self) -> dict[str, Any]:
        return {p.name: p.as_dict(applied=self.applied) for p in self.plans}


def guest_facts(guest: MountedGuest) -> dict[str, Any]:
    """The guest's identity as the results show it."""
    facts: dict[str, Any] = {
        "family": "linux",
        "root": guest.root.describe(),
        "boot": None if "/boot" not in guest.mounted else guest.boot.describe(),
    }
    if guest.release is not None:
        facts.update(guest.release.as_dict())
    return facts


def _each(
    steps: Sequence[Step], progress: Progress, phase: str, doing: str, span: range
) -> Iterator[Step]:
    """``steps`` one by one, each announced in ``phase`` as ``doing`` it, the
    percentage rising through ``span``."""
    start, width = span.start, len(span)
    for index, step in enumerate(steps):
        progress.step(
            phase,
            start + width * index // max(1, len(steps)),
            f"{doing} the {step.name} fix",
            {"fix": step.name},
        )
        yield step


def _plan_all(
    guest: MountedGuest, steps: Sequence[Step], progress: Progress, phase: str
) -> list[FixPlan]:
    return [
        step.plan(guest)
        for step in _each(steps, progress, phase, "Working out", range(30, 60))
    ]


def _apply_all(
    guest: MountedGuest, steps: Sequence[Step], progress: Progress
) -> list[FixPlan]:
    plans = []
    for step in _each(steps, progress, APPLYING, "Applying", range(60, 95)):
        plan = step.plan(guest)
        changes.apply(guest.tree, plan.changes)
        if plan.changes:
            progress.ctx.report(
                APPLYING,
                None,
                f"{step.name}: changed {len(plan.changes)} paths",
                {"fix": step.name, "paths": [c.path for c in plan.changes]},
            )
        plans.append(plan)
    return plans


def _mounts_to_write(guest: MountedGuest, plans: Sequence[FixPlan]) -> frozenset[str]:
    return frozenset(
        guest.tree.mount_of(change.path).guest_path
        for plan in plans
        for change in plan.changes
    )


def _label(target: WorkTarget) -> str:
    if target.dry_run:
        return f"{target.source.path} (dry run)"
    if target.in_place:
        return f"{target.source.path} (in place)"
    return f"the overlay over {target.source.path}"


def modify_guest(
    ctx: OperationContext,
    steps: Sequence[Step],
    *,
    check: Callable[[list[FixPlan]], None] | None = None,
) -> Outcome:
    """Run ``steps`` on the job's guest as the module docstring says.

    ``check`` sees the plans of the read-only pass and may refuse them
    with an :class:`OperationError` before anything is written.
    """
    progress = Progress(ctx, Deadline(ctx.spec))
    progress.step(VALIDATION, 0, "Checking the image and the parameters")
    with progress.errors(), working_image(ctx) as target:
        progress.deadline = target.deadline
        with open_disk(
            progress,
            target.path,
            target.driver,
            writable=target.writable,
            label=_label(target),
        ) as disk:
            facts = discover(disk, progress)
            root = require_linux(facts, progress.phase)
            with mount_guest(
                disk, facts.devices, root, checkpoint=progress.checkpoint
            ) as guest:
                facts_out = guest_facts(guest)
                notes = list(guest.notes)
                plans = _plan_all(guest, steps, progress, PLANNING)
                writable = _mounts_to_write(guest, plans)
            if check is not None:
                check(plans)
            applied = False
            if writable and not target.dry_run:
                with mount_guest(
                    disk,
                    facts.devices,
                    root,
                    writable=writable,
                    checkpoint=progress.checkpoint,
                ) as guest:
                    plans = _apply_all(guest, steps, progress)
                applied = True
            progress.step(FINALIZE, 95, "Closing the guest disk")
    output = target.describe()
    ctx.report(FINALIZE, 100, "Done", {"output": output.get("path")})
    return Outcome(
        guest=facts_out,
        plans=plans,
        applied=applied,
        dry_run=target.dry_run,
        output=output,
        notes=notes,
    )
