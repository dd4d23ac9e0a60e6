"""Check and repair the filesystems of a guest disk: the ``fs_repair`` operation.

Every filesystem blkid finds is considered, on partitions, on a disk without
a partition table and on linear LVM logical volumes; each is shown to its
checker through a loop device of its own that nothing mounts.

- ext2/3/4: ``e2fsck -f -y``, then ``e2fsck -f -n`` to prove the result (a
  second repair pass if the proof still finds errors). A dry run only runs
  ``e2fsck -f -n``.
- XFS: ``xfs_repair -n`` first; on damage ``xfs_repair``, then ``-n`` again.
  A log that still holds changes is replayed the way xfs_repair asks, by
  mounting the filesystem read-write and unmounting it; the log is never
  zeroed (``-L``), which would throw those changes away. A log that no
  mount can replay leaves the filesystem unrepaired.
- Anything else (swap, vfat, LVM physical volumes, encrypted volumes,
  logical volumes no loop device can show) is listed as skipped, with why.

``parameters.filesystems`` (UUIDs or labels) limits the work to those; a
name no filesystem carries is an ``INVALID_PARAMETERS`` error naming it.

Every chosen filesystem is checked before the job decides: when one of them
is left with errors, a log it cannot replay, or a checker that could not
run, the job fails with ``FILESYSTEM_UNREPAIRABLE`` and the per-filesystem
report in the error's details. The job failed, so the overlay holding the
other repairs is not kept (run again with ``parameters.filesystems`` to
keep those); with ``in_place`` they stay, having been made on the image
itself. A dry run changes nothing and never fails on what it found: its
result says which filesystems have errors and what would be done.

Phases: ``validation``, ``discovery``, ``repair`` (one event per
filesystem, the percentage counting filesystems), ``finalize``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from h2k.errors import OperationError
from h2k.guest import GuestDisk
from h2k.guest import codes as guest_codes
from h2k.guest.disk import LVM_MEMBER
from h2k.guest.lvm import LogicalVolume
from h2k.guest.probe import Filesystem
from h2k.guest.volume import Volume
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import (
    FINALIZE,
    VALIDATION,
    fail,
    invalid_parameter,
    report_item,
    tool_errors,
)
from h2k.operations.target import WorkTarget, open_guest_disk, working_image
from h2k.repair import fsck
from h2k.repair.fsck import CheckRun

log = logging.getLogger(__name__)

DISCOVERY = "discovery"
REPAIR = "repair"
FIELD = "parameters.filesystems"
# How pvs names the volume group of a PV whose metadata it cannot read.
UNREADABLE_VG = "[unknown]"
UNREADABLE_REASON = (
    "an LVM physical volume whose metadata cannot be read: the filesystems "
    "on its logical volumes were not checked; run lvm_repair first"
)
# How many times e2fsck -y may run on one filesystem before it is left as is.
MAX_REPAIR_PASSES = 2

# A filesystem's state, before and after.
CLEAN = "clean"
ERRORS = "errors"
LOG_DIRTY = "log_dirty"
CHECK_FAILED = "check_failed"
NOT_CHECKED = "not_checked"
UNREPAIRED = frozenset({ERRORS, LOG_DIRTY, CHECK_FAILED})
_RUN_STATE = {
    fsck.CLEAN: CLEAN,
    fsck.CORRECTED: CLEAN,
    fsck.ERRORS: ERRORS,
    fsck.LOG_DIRTY: LOG_DIRTY,
    fsck.FAILED: CHECK_FAILED,
}


@dataclass(frozen=True)
class _Candidate:
    """A volume the job may check: a signature, or an LV no loop can show."""

    volume: Volume | None
    source: str
    fs: Filesystem | None
    skip_reason: str | None = None


@dataclass
class _Outcome:
    state_before: str
    state_after: str
    actions: list[str]
    runs: list[CheckRun]
    note: str | None = None


def run(ctx: OperationContext) -> dict[str, Any]:
    """Check, and unless dry_run repair, the filesystems of the job's image."""
    ctx.report(VALIDATION, 0, "Checking the image and the parameters")
    wanted = _wanted(ctx.parameters)
    with working_image(ctx) as target:
        with tool_errors(DISCOVERY, codes.TOOL_FAILED, "reading the guest disk"):
            reports = _work(ctx, target, wanted)
        # A dry run fails only where the repair is sure to: no checker ran.
        failing = {CHECK_FAILED} if target.dry_run else UNREPAIRED
        unrepaired = [r for r in reports if r["state_after"] in failing]
        if unrepaired:
            names = ", ".join(f"{r['volume']} ({r['type']})" for r in unrepaired)
            raise fail(
                REPAIR,
                codes.FILESYSTEM_UNREPAIRABLE,
                f"could not repair {names}: {unrepaired[0]['reason']}",
                filesystems=reports,
            )
    result: dict[str, Any] = {
        "output": target.describe(),
        "dry_run": target.dry_run,
        "filesystems": reports,
        "counts": _counts(reports),
    }
    ctx.report(
        FINALIZE,
        100,
        _closing_message(result["counts"], target.dry_run),
        {"output_path": result["output"].get("path")},
    )
    log.info("job %s: fs_repair finished: %s", ctx.job_id, result["counts"])
    return result


def _wanted(params: dict[str, Any]) -> list[str] | None:
    names = params.get("filesystems")
    if names is None:
        return None
    if not isinstance(names, list) or not all(
        isinstance(name, str) and name for name in names
    ):
        raise invalid_parameter(FIELD, f"{FIELD} must be a list of UUIDs or labels")
    return names


def _work(
    ctx: OperationContext, target: WorkTarget, wanted: list[str] | None
) -> list[dict[str, Any]]:
    message = "Looking for filesystems on the disk"
    with open_guest_disk(ctx, target, DISCOVERY, message) as disk:
        chosen = _select(_candidates(disk), wanted)
        ctx.report(
            DISCOVERY,
            None,
            f"Found {len(chosen)} volume(s) to consider",
            {"volumes": [c.source for c in chosen]},
        )
        reports = []
        for index, candidate in enumerate(chosen):
            report_item(
                ctx,
                REPAIR,
                index,
                len(chosen),
                _announce(candidate, target.dry_run),
                {"volume": candidate.source},
            )
            with tool_errors(REPAIR, codes.TOOL_FAILED, f"checking {candidate.source}"):
                reports.append(_handle(ctx, disk, target, candidate))
        ctx.report(REPAIR, 100, f"Considered {len(chosen)} volume(s)")
    return reports


def _candidates(disk: GuestDisk) -> list[_Candidate]:
    found = [_Candidate(fs.volume, fs.volume.source, fs) for fs in disk.filesystems()]
    if not any(c.fs is not None and c.fs.type == LVM_MEMBER for c in found):
        return found
    unreadable = {
        pv.volume for pv in disk.physical_volumes() if pv.vg_name == UNREADABLE_VG
    }
    found = [
        replace(c, skip_reason=UNREADABLE_REASON) if c.volume in unreadable else c
        for c in found
    ]
    return found + _hidden_lvs(disk.logical_volumes())


def _hidden_lvs(lvs: list[LogicalVolume]) -> list[_Candidate]:
    """Logical volumes filesystems() could not look into, to report them."""
    return [
        _Candidate(
            None,
            f"lvm {lv.path}",
            None,
            skip_reason=lv.reason or f"{lv.path} cannot be shown by a loop device",
        )
        for lv in lvs
        if lv.volume is None
    ]


def _select(found: list[_Candidate], wanted: list[str] | None) -> list[_Candidate]:
    """The candidates ``wanted`` names, in disk order; all when it is None."""
    if wanted is None:
        return found
    unknown = [name for name in wanted if not any(_named(c, name) for c in found)]
    if unknown:
        known = sorted(
            {
                value
                for c in found
                if c.fs is not None
                for value in (c.fs.uuid, c.fs.label)
                if value
            }
        )
        raise invalid_parameter(
            FIELD,
            f"no filesystem on the disk has the UUID or label "
            f"{', '.join(repr(n) for n in unknown)}; "
            f"the disk has {', '.join(known) or 'none'}",
        )
    return [c for c in found if any(_named(c, name) for name in wanted)]


def _named(candidate: _Candidate, name: str) -> bool:
    """UUIDs compare without case (blkid prints them lower case), labels exactly."""
    fs = candidate.fs
    if fs is None:
        return False
    return (fs.uuid is not None and fs.uuid.lower() == name.lower()) or fs.label == name


def _announce(candidate: _Candidate, dry_run: bool) -> str:
    fs = candidate.fs
    what = candidate.source if fs is None else f"{candidate.source} ({fs.type})"
    if fs is None or fsck.checker_for(fs.type) is None or fs.usage != "filesystem":
        verb = "Skipping"
    else:
        verb = "Checking" if dry_run else "Checking and repairing"
    return f"{verb} {what}"


def _skip_reason(fs: Filesystem) -> str | None:
    if fs.type == LVM_MEMBER:
        return (
            "an LVM physical volume: the filesystems on its logical volumes "
            "are checked on their own (lvm_repair checks its metadata)"
        )
    if fs.usage == "crypto":
        return f"an encrypted volume ({fs.type}): its contents cannot be checked"
    if fs.type == "swap":
        return "swap space holds no filesystem to check"
    if fs.usage != "filesystem" or fsck.checker_for(fs.type) is None:
        return f"h2k checks ext2, ext3, ext4 and XFS, not {fs.type}"
    return None


def _handle(
    ctx: OperationContext, disk: GuestDisk, target: WorkTarget, candidate: _Candidate
) -> dict[str, Any]:
    fs = candidate.fs
    reason = candidate.skip_reason
    if reason is None and fs is not None:
        reason = _skip_reason(fs)
    if fs is None or reason is not None:
        return _report(
            candidate, None, _Outcome(NOT_CHECKED, NOT_CHECKED, [], []), reason
        )
    tool = fsck.checker_for(fs.type)
    steps = _Steps(ctx, disk, target, fs)
    outcome = _repair_ext(steps) if tool == fsck.E2FSCK else _repair_xfs(steps)
    return _report(candidate, tool, outcome, outcome.note)


@dataclass
class _Steps:
    """One filesystem's way through its checker: the runs and the actions."""

    ctx: OperationContext
    disk: GuestDisk
    target: WorkTarget
    fs: Filesystem
    runs: list[CheckRun] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def tool(self, checker: Callable[..., CheckRun], *, repair: bool) -> CheckRun:
        """Run ``checker`` on a loop device of its own, writable only to repair."""
        with self.disk.attach(self.fs, writable=repair) as device:
            done = checker(
                device,
                repair=repair,
                should_stop=self.ctx.should_stop,
                # No cap: a large filesystem takes long; the job's limit holds.
                timeout=self.target.deadline.remaining(REPAIR),
            )
        self.runs.append(done)
        self.act("checked")
        return done

    def act(self, action: str) -> None:
        if action not in self.actions:
            self.actions.append(action)

    def outcome(self, before: str, after: str, last: CheckRun | None) -> _Outcome:
        note = None if after == CLEAN or last is None else _note(last)
        return _Outcome(before, after, self.actions, self.runs, note)


def _repair_ext(steps: _Steps) -> _Outcome:
    """e2fsck -y, then -n to prove it; a second -y if the proof finds errors."""
    if steps.target.dry_run:
        check = steps.tool(fsck.e2fsck, repair=False)
        state = _RUN_STATE[check.state]
        if state == ERRORS:
            steps.act("would_repair")
        return steps.outcome(state, state, check)
    first = steps.tool(fsck.e2fsck, repair=True)
    if first.state in (fsck.FAILED, fsck.CLEAN):
        state = _RUN_STATE[first.state]
        return steps.outcome(state, state, first)
    if first.state == fsck.CORRECTED:
        steps.act("repaired")
    proof = steps.tool(fsck.e2fsck, repair=False)
    passes = 1
    while proof.state == fsck.ERRORS and passes < MAX_REPAIR_PASSES:
        again = steps.tool(fsck.e2fsck, repair=True)
        passes += 1
        if again.state == fsck.FAILED:
            return steps.outcome(ERRORS, CHECK_FAILED, again)
        if again.state == fsck.CORRECTED:
            steps.act("repaired")
        proof = steps.tool(fsck.e2fsck, repair=False)
    return steps.outcome(ERRORS, _RUN_STATE[proof.state], proof)


def _repair_xfs(steps: _Steps) -> _Outcome:
    """xfs_repair -n; replay a dirty log by mounting; xfs_repair; -n again."""
    check = steps.tool(fsck.xfs_repair, repair=False)
    before = _RUN_STATE[check.state]
    if before in (CLEAN, CHECK_FAILED):
        return steps.outcome(before, before, check)
    if steps.target.dry_run:
        steps.act("would_replay_log" if before == LOG_DIRTY else "would_repair")
        return steps.outcome(before, before, check)
    if before == LOG_DIRTY:
        refused = _replay_log(steps)
        if refused is not None:
            return _Outcome(before, LOG_DIRTY, steps.actions, steps.runs, refused)
        check = steps.tool(fsck.xfs_repair, repair=False)
        if check.state != fsck.ERRORS:
            return steps.outcome(before, _RUN_STATE[check.state], check)
    fix = steps.tool(fsck.xfs_repair, repair=True)
    if fix.state != fsck.CORRECTED:
        return steps.outcome(before, _RUN_STATE[fix.state], fix)
    steps.act("repaired")
    proof = steps.tool(fsck.xfs_repair, repair=False)
    return steps.outcome(before, _RUN_STATE[proof.state], proof)


def _replay_log(steps: _Steps) -> str | None:
    """Mount read-write and unmount, as xfs_repair asks; why not, if that failed."""
    try:
        with steps.disk.mount(steps.fs, writable=True):
            pass
    except OperationError as exc:
        if exc.code != guest_codes.MOUNT_FAILED:
            raise
        return (
            "the XFS log holds changes and mounting the filesystem to replay "
            f"them failed ({exc.message}); h2k does not zero the log "
            "(xfs_repair -L), which would throw those changes away"
        )
    steps.act("replayed_log")
    return None


def _note(run: CheckRun) -> str:
    detail = run.lines[0] if run.lines else ""
    return f"{run.tool}: {run.meaning}" + (f": {detail}" if detail else "")


def _where(source: str) -> tuple[int | None, str | None]:
    """The partition number or the logical volume a volume's source names."""
    kind, _, rest = source.partition(" ")
    if kind == "partition" and rest.isdigit():
        return int(rest), None
    if kind == "lvm":
        return None, rest
    return None, None


def _report(
    candidate: _Candidate, tool: str | None, outcome: _Outcome, reason: str | None
) -> dict[str, Any]:
    fs = candidate.fs
    partition, logical_volume = _where(candidate.source)
    volume = candidate.volume
    return {
        "volume": candidate.source,
        "partition": partition,
        "logical_volume": logical_volume,
        "offset_bytes": volume.offset if volume else None,
        "size_bytes": volume.size if volume else None,
        "type": fs.type if fs else None,
        "uuid": fs.uuid if fs else None,
        "label": fs.label if fs else None,
        "state_before": outcome.state_before,
        "state_after": outcome.state_after,
        "actions": outcome.actions or ["skipped"],
        "reason": reason,
        "tool": tool,
        "exit_code": outcome.runs[0].exit_code if outcome.runs else None,
        "runs": [r.as_dict() for r in outcome.runs],
        "summary": fsck.combined_lines(outcome.runs),
    }


def _counts(reports: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "checked": sum(1 for r in reports if r["state_before"] != NOT_CHECKED),
        "skipped": sum(1 for r in reports if r["state_before"] == NOT_CHECKED),
        "clean_before": sum(1 for r in reports if r["state_before"] == CLEAN),
        "repaired": sum(1 for r in reports if "repaired" in r["actions"]),
        "log_replayed": sum(1 for r in reports if "replayed_log" in r["actions"]),
        "needing_repair": sum(1 for r in reports if r["state_after"] in UNREPAIRED),
    }


def _closing_message(counts: dict[str, int], dry_run: bool) -> str:
    if dry_run:
        return (
            f"Dry run: checked {counts['checked']} filesystem(s), "
            f"{counts['needing_repair']} need repair; nothing was changed"
        )
    return (
        f"Checked {counts['checked']} filesystem(s), repaired {counts['repaired']}, "
        f"skipped {counts['skipped']}"
    )
