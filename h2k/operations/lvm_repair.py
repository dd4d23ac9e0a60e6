"""Check, restore and back up a guest's LVM metadata: the ``lvm_repair`` operation.

The physical volumes blkid finds on the disk are shown to the LVM tools
through loop devices, without device-mapper (:mod:`h2k.repair.lvm_metadata`).
For each one pvck checks the label, the PV header and every metadata area,
and lists every copy of volume group metadata the areas still hold.

Which copy a volume group gets back:

- When any of its metadata areas (on any of its PVs) is healthy, its
  current copy is the committed metadata: the newest of those is used, and
  a copy with a higher seqno elsewhere (an update that never completed) is
  ignored.
- Otherwise the newest copy that is whole (pvck parses it, h2k parses it,
  its VG id and seqno agree) from the areas' history is used. When it is
  older than the newest copy seen, the result says so: the metadata
  changes made after it are lost (logical volumes created or resized
  since).
- A PV belongs to the group its committed metadata names. A PV reused for
  a new group still holds copies of the old one: a group known only from
  such history is ignored unless one of its PVs is damaged, and when two
  groups' histories claim a damaged PV, the one whose copy LVM wrote last
  (the copies' ``creation_time``) gets it; when that cannot tell, the job
  fails with ``LVM_METADATA_DAMAGED``.

Every PV of the group that is damaged, or whose metadata is older than that
copy, gets it written back into its metadata areas (``pvck --repairtype
metadata``), then pvck and vgck check the group again. A damaged PV for
which no whole copy exists, or whose PV header (the sector that says where
its metadata areas are) is damaged, fails the job with
``LVM_METADATA_DAMAGED`` before anything is written: h2k does not guess a
PV header. A disk without a PV fails with ``NO_LVM``. A dry run reports what
it would restore, from where, and changes nothing.

Backups: the metadata of every volume group that ends healthy is saved with
``vgcfgbackup`` and returned in the result (``volume_groups[].backup.text``,
the text ``vgcfgrestore -f`` reads), so it travels with the job record
whether the changes went to an overlay, in place, or nowhere (dry run).

Phases: ``validation``, ``discovery``, ``check`` (one event per PV),
``repair`` (one per PV rewritten), ``backup`` (one per volume group),
``finalize``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from h2k.guest import GuestDisk
from h2k.guest.disk import LVM_MEMBER
from h2k.guest.lvm import TIMEOUT_SECONDS as LVM_TIMEOUT_SECONDS
from h2k.guest.probe import probe
from h2k.guest.volume import Volume
from h2k.operations import codes
from h2k.operations.base import OperationContext
from h2k.operations.common import FINALIZE, VALIDATION, fail, report_item, tool_errors
from h2k.operations.target import WorkTarget, open_guest_disk, working_image
from h2k.repair import lvm_text
from h2k.repair.lvm_metadata import LvmTools, MetadataCopy, PvHeaders
from h2k.repair.lvm_text import VgMetadata

log = logging.getLogger(__name__)

DISCOVERY = "discovery"
CHECK = "check"
REPAIR = "repair"
BACKUP = "backup"
SCRATCH = "lvm-repair"

CLEAN = "clean"
DAMAGED = "damaged"
STALE = "stale"
UNUSED = "unused"
UNKNOWN = "unknown"


@dataclass
class _Group:
    """A volume group, the copy it gets and what happens to it."""

    vg_id: str
    copy: MetadataCopy
    metadata: VgMetadata
    file: str
    newest_seen: int
    members: list[PvHeaders] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    to_restore: list[PvHeaders] = field(default_factory=list)
    state_before: str = CLEAN
    state_after: str = CLEAN
    actions: list[str] = field(default_factory=lambda: ["checked"])
    backup: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)


def run(ctx: OperationContext) -> dict[str, Any]:
    """Check, and unless dry_run restore, the LVM metadata of the job's image."""
    ctx.report(VALIDATION, 0, "Checking the image and the parameters")
    with working_image(ctx) as target:
        with tool_errors(DISCOVERY, codes.TOOL_FAILED, "reading the LVM metadata"):
            pvs, groups = _work(ctx, target)
    result: dict[str, Any] = {
        "output": target.describe(),
        "dry_run": target.dry_run,
        "backup_location": "result: volume_groups[].backup.text",
        "physical_volumes": pvs,
        "volume_groups": groups,
    }
    restored = sum(1 for g in groups if "restored_metadata" in g["actions"])
    message = (
        f"Dry run: {sum(1 for g in groups if g['state_before'] != CLEAN)} volume "
        "group(s) would be restored; nothing was changed"
        if target.dry_run
        else f"Checked {len(groups)} volume group(s), restored {restored}"
    )
    ctx.report(FINALIZE, 100, message, {"output_path": result["output"].get("path")})
    log.info("job %s: lvm_repair finished: %s", ctx.job_id, message)
    return result


def _work(
    ctx: OperationContext, target: WorkTarget
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    message = "Looking for LVM physical volumes on the disk"
    with open_guest_disk(ctx, target, DISCOVERY, message) as disk:
        members = _physical_volumes(ctx, disk, target)
        if not members:
            raise fail(
                DISCOVERY,
                codes.NO_LVM,
                f"no LVM physical volume on {target.source.path}: blkid found "
                "no LVM2_member signature on any partition",
            )
        scratch = os.path.join(disk.directory, SCRATCH)
        os.makedirs(os.path.join(scratch, "system"), mode=0o700)
        with contextlib.ExitStack() as stack:
            loops = {
                stack.enter_context(disk.attach(v, writable=target.writable)): v
                for v in members
            }
            tools = LvmTools(
                devices=sorted(loops),
                system_dir=os.path.join(scratch, "system"),
                should_stop=ctx.should_stop,
                timeout=lambda: target.deadline.capped(CHECK, LVM_TIMEOUT_SECONDS),
            )
            return _repair(ctx, target, tools, loops, scratch)


def _physical_volumes(
    ctx: OperationContext, disk: GuestDisk, target: WorkTarget
) -> list[Volume]:
    """The volumes blkid calls LVM2_member; read before any LVM tool runs."""
    found = []
    for volume in disk.volumes():
        signature = probe(
            disk.raw_path,
            volume,
            should_stop=ctx.should_stop,
            timeout=target.deadline.capped(DISCOVERY, LVM_TIMEOUT_SECONDS),
        )
        if signature is not None and signature.type == LVM_MEMBER:
            found.append(volume)
    return found


def _repair(
    ctx: OperationContext,
    target: WorkTarget,
    tools: LvmTools,
    loops: dict[str, Volume],
    scratch: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    headers = []
    copies: list[MetadataCopy] = []
    for index, device in enumerate(sorted(loops, key=lambda d: loops[d].offset)):
        source = loops[device].source
        report_item(
            ctx, CHECK, index, len(loops), f"Checking the LVM metadata on {source}"
        )
        found = tools.headers(device)
        headers.append(found)
        copies.extend(tools.copies(found))
    ctx.report(CHECK, 100, f"Checked {len(loops)} physical volume(s)")

    groups = _plan(tools, headers, copies, scratch)
    before = {h.device: _pv_state(h, groups) for h in headers}
    lost = _without_copy(headers, groups)
    broken = [h for h in headers if h.problems]
    if lost or broken:
        what = (
            "is damaged and no whole copy of it was found on the disk to restore"
            if lost
            else "has a damaged PV header, which h2k does not rewrite"
        )
        names = ", ".join(loops[h.device].source for h in (lost or broken))
        raise fail(
            CHECK,
            codes.LVM_METADATA_DAMAGED,
            f"the LVM metadata on {names} {what}",
            physical_volumes=[
                _describe_pv(h, loops, groups, h, (before[h.device],) * 2)
                for h in headers
            ],
        )
    if target.dry_run:
        for group in groups:
            if group.to_restore:
                group.actions.append("would_restore_metadata")
                group.state_after = group.state_before
    else:
        _restore(ctx, tools, loops, groups)
    after_headers = (
        headers if target.dry_run else [tools.headers(h.device) for h in headers]
    )
    after = {h.device: _pv_state(h, groups) for h in after_headers}
    _back_up(ctx, tools, groups, scratch)
    headers_before = {h.device: h for h in headers}
    pvs = [
        _describe_pv(
            h,
            loops,
            groups,
            headers_before[h.device],
            (before[h.device], after[h.device]),
        )
        for h in after_headers
    ]
    where = {h.uuid: loops[h.device].source for h in headers}
    return pvs, [_describe_group(g, where) for g in groups]


def _plan(
    tools: LvmTools,
    headers: list[PvHeaders],
    copies: list[MetadataCopy],
    scratch: str,
) -> list[_Group]:
    """Choose, for every volume group current on the disk, the copy it gets.

    A PV belongs to the group its committed metadata names; only a PV with
    no committed metadata can be claimed from history. A group known only
    from history (an old group whose PVs moved on, say) counts only when one
    of its PVs is damaged.
    """
    owners = {c.pv_uuid: c.vg_id for c in copies if c.trusted}
    by_vg: dict[str, list[MetadataCopy]] = {}
    for copy in copies:
        by_vg.setdefault(copy.vg_id, []).append(copy)
    groups = []
    for vg_id, found in by_vg.items():
        chosen = _choose(tools, found, scratch)
        if chosen is None:
            log.warning("no whole copy of the metadata of VG %s", vg_id)
            continue
        copy, metadata, path = chosen
        listed = metadata.pv_ids()
        members = [
            h
            for h in headers
            if h.uuid in listed and owners.get(h.uuid, vg_id) == vg_id
        ]
        if not copy.trusted and not any(h.damaged for h in members):
            continue
        groups.append(
            _Group(
                vg_id=vg_id,
                copy=copy,
                metadata=metadata,
                file=path,
                newest_seen=max(c.seqno for c in found),
                members=members,
            )
        )
    _settle_claims(groups)
    groups = [g for g in groups if g.members]
    for group in groups:
        _assess(group)
    groups.sort(key=lambda g: g.metadata.name)
    return groups


def _settle_claims(groups: list[_Group]) -> None:
    """Give a PV several groups claim to one of them, or stop.

    The committed group wins. Among groups known only from history (a PV
    reused for a new group keeps the old group's copies), the one whose
    copy LVM wrote last wins; when the times do not tell, h2k stops.
    """
    for headers in {h.device: h for g in groups for h in g.members}.values():
        claims = [g for g in groups if headers in g.members]
        if len(claims) < 2:
            continue
        winner = _latest(claims)
        if winner is None:
            names = ", ".join(sorted(g.metadata.name for g in claims))
            raise fail(
                CHECK,
                codes.LVM_METADATA_DAMAGED,
                f"the metadata on PV {lvm_text.dashed_uuid(headers.uuid)} is "
                f"damaged and copies of several volume groups ({names}) claim "
                "it; h2k cannot tell which one is current",
            )
        for group in claims:
            if group is not winner:
                group.members.remove(headers)
                log.info(
                    "PV %s belongs to %s; the copies of %s on it are older",
                    headers.uuid,
                    winner.metadata.name,
                    group.metadata.name,
                )


def _latest(claims: list[_Group]) -> _Group | None:
    committed = [g for g in claims if g.copy.trusted]
    if committed:
        return committed[0] if len(committed) == 1 else None
    times = [g.metadata.written_at for g in claims]
    if None in times:
        return None
    newest = max(t for t in times if t is not None)
    latest = [g for g in claims if g.metadata.written_at == newest]
    return latest[0] if len(latest) == 1 else None


def _assess(group: _Group) -> None:
    """Which members need the copy, and what the result should warn about."""
    metadata = group.metadata
    present = {h.uuid for h in group.members}
    group.missing = sorted(
        pv.id for pv in metadata.pvs if lvm_text.normal_uuid(pv.id) not in present
    )
    group.to_restore = [h for h in group.members if _needs(h, metadata.seqno)]
    if group.to_restore:
        group.state_before = group.state_after = DAMAGED
    if group.missing:
        group.warnings.append(
            f"{len(group.missing)} physical volume(s) of {metadata.name} are "
            "not on this disk; vgck cannot check the group as a whole"
        )
    if group.copy.seqno >= group.newest_seen:
        return
    if group.copy.trusted:
        group.warnings.append(
            f"a copy with seqno {group.newest_seen} was found that no metadata "
            "area points to (an update that never completed); the committed "
            f"seqno {group.copy.seqno} was kept"
        )
    elif group.to_restore:
        group.warnings.append(
            f"the newest metadata seen (seqno {group.newest_seen}) is damaged; "
            f"seqno {group.copy.seqno} is the newest whole copy, so the changes "
            "made after it (logical volumes created, resized or removed "
            "since) are not in the restored metadata"
        )


def _choose(
    tools: LvmTools, found: list[MetadataCopy], scratch: str
) -> tuple[MetadataCopy, VgMetadata, str] | None:
    """The committed copy if a healthy area has one, else the newest whole one."""
    trusted = [c for c in found if c.trusted]
    pool = trusted or [
        c for c in found if not c.parse_error and not (c.current and not c.trusted)
    ]
    for copy in sorted(pool, key=lambda c: c.seqno, reverse=True):
        path = os.path.join(
            scratch, f"{copy.vg_id}-{copy.pv_uuid}-{copy.area}-{copy.offset}.vg"
        )
        metadata = tools.save(copy, path)
        if metadata is not None:
            return copy, metadata, path
    return None


def _needs(headers: PvHeaders, seqno: int) -> bool:
    if headers.damaged:
        return True
    return any(a.current_seqno != seqno for a in headers.areas)


def _without_copy(headers: list[PvHeaders], groups: list[_Group]) -> list[PvHeaders]:
    placed = {h.device for g in groups for h in g.members}
    return [h for h in headers if h.damaged and h.device not in placed]


def _group_of(headers: PvHeaders, groups: list[_Group]) -> _Group | None:
    return next(
        (g for g in groups if headers.uuid in {h.uuid for h in g.members}), None
    )


def _pv_state(headers: PvHeaders, groups: list[_Group]) -> str:
    group = _group_of(headers, groups)
    if headers.damaged:
        return DAMAGED
    if group is None:
        return UNUSED if not any(a.current_seqno for a in headers.areas) else UNKNOWN
    if _needs(headers, group.metadata.seqno):
        return STALE
    return CLEAN


def _restore(
    ctx: OperationContext,
    tools: LvmTools,
    loops: dict[str, Volume],
    groups: list[_Group],
) -> None:
    work = [(g, h) for g in groups for h in g.to_restore]
    for index, (group, headers) in enumerate(work):
        where = loops[headers.device].source
        report_item(
            ctx,
            REPAIR,
            index,
            len(work),
            f"Writing seqno {group.copy.seqno} of {group.metadata.name} to {where}",
        )
        result = tools.restore(headers, group.file)
        if result.returncode != 0:
            raise fail(
                REPAIR,
                codes.LVM_METADATA_DAMAGED,
                f"pvck could not write the metadata of {group.metadata.name} "
                f"to {where}: {_last(result.stderr or result.stdout)}",
            )
    for group in groups:
        if not group.to_restore:
            continue
        group.actions.append("restored_metadata")
        problems = _still_wrong(tools, group)
        if problems:
            raise fail(
                REPAIR,
                codes.LVM_METADATA_DAMAGED,
                f"restoring seqno {group.copy.seqno} of {group.metadata.name} did "
                f"not take: {problems[0]}",
                problems=problems,
            )
        group.state_after = CLEAN
    if work:
        ctx.report(REPAIR, 100, f"Restored the metadata on {len(work)} PV(s)")


def _still_wrong(tools: LvmTools, group: _Group) -> list[str]:
    problems = []
    for member in group.members:
        again = tools.headers(member.device)
        problems.extend(again.all_problems())
        if _needs(again, group.metadata.seqno) and not again.all_problems():
            problems.append(f"{member.device} still holds another seqno")
    if not group.missing:
        checked = tools.vgck(group.metadata.name)
        if checked.returncode != 0:
            problems.append(f"vgck: {_last(checked.stderr or checked.stdout)}")
    return problems


def _back_up(
    ctx: OperationContext,
    tools: LvmTools,
    groups: list[_Group],
    scratch: str,
) -> None:
    healthy = [g for g in groups if g.state_after == CLEAN]
    for index, group in enumerate(healthy):
        name = group.metadata.name
        report_item(
            ctx, BACKUP, index, len(healthy), f"Backing up the metadata of {name}"
        )
        path = os.path.join(scratch, f"backup-{group.vg_id}.vg")
        result = tools.backup(name, path)
        if result.returncode != 0:
            group.warnings.append(
                f"vgcfgbackup failed: {_last(result.stderr or result.stdout)}"
            )
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        group.backup = {
            "file_name": f"{name}.vg",
            "seqno": lvm_text.parse_vg(text).seqno,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "text": text,
        }
        group.actions.append("backed_up")
    if healthy:
        ctx.report(BACKUP, 100, f"Backed up {len(healthy)} volume group(s)")


def _last(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _describe_pv(
    headers: PvHeaders,
    loops: dict[str, Volume],
    groups: list[_Group],
    before: PvHeaders,
    states: tuple[str, str],
) -> dict[str, Any]:
    """A PV's result entry: ``headers`` as it is now, ``before`` as first found."""
    volume = loops[headers.device]
    group = _group_of(headers, groups)
    return {
        "volume": volume.source,
        "offset_bytes": volume.offset,
        "size_bytes": volume.size,
        "uuid": lvm_text.dashed_uuid(headers.uuid),
        "vg_name": group.metadata.name if group else None,
        "state_before": states[0],
        "state_after": states[1],
        "problems_found": before.all_problems(),
        "problems_left": headers.all_problems() if headers is not before else [],
        "metadata_areas": [
            {
                "number": area.number,
                "offset_bytes": area.offset,
                "size_bytes": area.size,
                "seqno": area.current_seqno,
            }
            for area in headers.areas
        ],
    }


def _describe_group(group: _Group, where: dict[str, str]) -> dict[str, Any]:
    """The result entry of a group; ``where`` maps PV UUIDs to their volume."""
    metadata = group.metadata
    copy = group.copy
    return {
        "name": metadata.name,
        "uuid": metadata.id,
        "seqno": metadata.seqno,
        "extent_size_bytes": metadata.extent_size,
        "pvs": [
            {"uuid": pv.id, "volume": where.get(lvm_text.normal_uuid(pv.id))}
            for pv in metadata.pvs
        ],
        "lvs": [
            {"name": lv.name, "size_bytes": lv.size, "segtypes": list(lv.segtypes)}
            for lv in metadata.lvs
        ],
        "state_before": group.state_before,
        "state_after": group.state_after,
        "actions": group.actions,
        # The copy written back, or in a dry run the one that would be.
        "metadata_source": None
        if not group.to_restore
        else {
            "pv_uuid": copy.pv_uuid,
            "metadata_area": copy.area,
            "offset_bytes": copy.offset,
            "seqno": copy.seqno,
            "committed": copy.trusted,
        },
        "newest_seqno_seen": group.newest_seen,
        "backup": group.backup,
        "warnings": group.warnings,
    }
