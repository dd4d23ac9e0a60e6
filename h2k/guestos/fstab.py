"""/etc/fstab: read it, and replace kernel device names by UUIDs.

An fstab line naming ``/dev/sda2`` stops working when the disk becomes
/dev/vda under virtio. The fix swaps the first field for ``UUID=...`` of the
filesystem that device is on this disk, and leaves every other byte of the
line (spacing, options, comments, other lines) as it was, so the file a
person wrote stays theirs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from h2k.guestos import changes
from h2k.guestos.changes import FixPlan
from h2k.guestos.devices import DEVICE_NAME, DeviceIndex
from h2k.guestos.tree import GuestTree

FSTAB = "/etc/fstab"
_FIRST_FIELD = re.compile(r"^(\s*)(\S+)")
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Entry:
    """One fstab line: fields as written (octal escapes decoded) and line number."""

    line: int
    spec: str
    mountpoint: str
    type: str
    options: str
    dump: str
    passno: str


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Entry]:
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        entries.append(
            Entry(
                line=number,
                spec=_unescape(fields[0]),
                mountpoint=_unescape(fields[1]),
                type=fields[2] if len(fields) > 2 else "auto",
                options=fields[3] if len(fields) > 3 else "defaults",
                dump=fields[4] if len(fields) > 4 else "0",
                passno=fields[5] if len(fields) > 5 else "0",
            )
        )
    return entries


def read(tree: GuestTree) -> list[Entry]:
    text = tree.read_text(FSTAB)
    return [] if text is None else parse(text)


def describe(tree: GuestTree, devices: DeviceIndex) -> dict[str, Any] | None:
    """fstab's entries, each with the kind of name it uses and what it names."""
    text = tree.read_text(FSTAB)
    if text is None:
        return None
    entries = []
    for entry in parse(text):
        kind = devices.classify(entry.spec)
        target = devices.lookup(entry.spec)
        entries.append(
            {
                "line": entry.line,
                "spec": entry.spec,
                "mountpoint": entry.mountpoint,
                "type": entry.type,
                "options": entry.options,
                "dump": entry.dump,
                "pass": entry.passno,
                "spec_kind": kind,
                "device_name": kind == DEVICE_NAME,
                "resolves_to": None if target is None else target.describe(),
            }
        )
    return {"path": FSTAB, "entries": entries}


def _normal(mountpoint: str) -> str:
    return mountpoint.rstrip("/") or "/"


def mount_spec(tree: GuestTree, mountpoint: str) -> str | None:
    """The first field of the fstab line that mounts ``mountpoint``."""
    for entry in read(tree):
        if _normal(entry.mountpoint) == _normal(mountpoint):
            return entry.spec
    return None


def plan(tree: GuestTree, devices: DeviceIndex) -> FixPlan:
    """Replace every device name that resolves on this disk with ``UUID=``."""
    result = FixPlan("fstab")
    text = tree.read_text(FSTAB)
    if text is None:
        result.applicable = False
        result.notes.append(f"the guest has no {FSTAB}")
        return result
    lines = text.splitlines(keepends=True)
    replaced = []
    for entry in parse(text):
        if devices.classify(entry.spec) != DEVICE_NAME:
            continue
        stable = devices.stable_name(entry.spec)
        if stable is None:
            result.notes.append(
                f"line {entry.line}: {entry.spec} ({entry.mountpoint}) is not a "
                "filesystem of this disk; left as it is"
            )
            continue
        index = entry.line - 1
        lines[index] = _FIRST_FIELD.sub(_first_field_as(stable), lines[index], count=1)
        replaced.append(
            {
                "line": entry.line,
                "mountpoint": entry.mountpoint,
                "before": entry.spec,
                "after": stable,
            }
        )
    result.found["replaced"] = replaced
    after = "".join(lines)
    if after != text:
        summary = ", ".join(f"{r['before']} -> {r['after']}" for r in replaced)
        result.changes.append(changes.modify(FSTAB, text, after, summary))
    return result


def _first_field_as(new: str) -> Callable[[re.Match[str]], str]:
    """A substitution keeping the indentation before the first field."""
    return lambda match: match.group(1) + new
