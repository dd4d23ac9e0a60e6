"""Kernel command-line arguments that name filesystems: ``root=``, ``resume=``.

They appear in grub.cfg, grubenv, BLS entries, /etc/default/grub,
/etc/kernel/cmdline and GRUB legacy's menu.lst, always as ``root=VALUE``
between blanks or quotes. :class:`ArgumentFixer` decides a replacement for
each value and :func:`rewrite` applies it to any of those texts without
touching the rest of the line.

What is replaced, and why:

- a kernel device name (``root=/dev/sda2``) that is a filesystem of this
  disk: its ``UUID=``; virtio renames the disk, UUIDs stay;
- a ``root=`` whose UUID, label or partition UUID is on no filesystem of
  this disk (the filesystem was recreated, or the name never matched):
  the UUID of the root filesystem h2k found, since the root is on this disk;
- a ``resume=`` naming a device or UUID that is not here: the UUID of the
  disk's only swap, when it has exactly one.

Values of other kinds (``root=/dev/nfs``, ``root=live:...``, ZFS datasets)
and LVM names (stable across hypervisors) are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from h2k.guestos.devices import DEVICE_NAME, LVM, OTHER, DeviceIndex, DiskFs

PARAMETERS = ("root", "resume")
_ARGUMENT = re.compile(r"(?<![^\s\"'=])(?P<param>root|resume)=(?P<value>[^\s\"';]+)")


@dataclass(frozen=True)
class Argument:
    """One ``param=value`` found in a file."""

    path: str
    param: str
    value: str
    kind: str
    target: DiskFs | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "param": self.param,
            "value": self.value,
            "kind": self.kind,
            "device_name": self.kind == DEVICE_NAME,
            "resolves_to": None if self.target is None else self.target.source,
        }


def find(path: str, text: str, devices: DeviceIndex) -> list[Argument]:
    """Every ``root=``/``resume=`` in ``text``, with what it names here."""
    found = []
    for match in _ARGUMENT.finditer(text):
        value = match.group("value")
        found.append(
            Argument(
                path,
                match.group("param"),
                value,
                devices.classify(value),
                devices.lookup(value),
            )
        )
    return found


@dataclass
class ArgumentFixer:
    """Chooses the replacement of each argument; see the module docstring."""

    devices: DeviceIndex
    root: DiskFs
    notes: list[str] = field(default_factory=list)

    def replacement(self, param: str, value: str) -> str | None:
        kind = self.devices.classify(value)
        if kind in (OTHER, LVM):
            return None
        target = self.devices.lookup(value)
        if param == "root":
            return self._root(value, kind, target)
        return self._resume(value, kind, target)

    def _root(self, value: str, kind: str, target: DiskFs | None) -> str | None:
        if target is not None:
            if target.fs.volume != self.root.fs.volume:
                self.notes.append(
                    f"root={value} names {target.source}, not the root filesystem "
                    f"h2k found ({self.root.source}); left as it is"
                )
                return None
            if kind == DEVICE_NAME and target.uuid:
                return f"UUID={target.uuid}"
            return None
        if not self.root.uuid:
            return None
        return f"UUID={self.root.uuid}"

    def _resume(self, value: str, kind: str, target: DiskFs | None) -> str | None:
        if target is not None:
            if kind == DEVICE_NAME and target.uuid:
                return f"UUID={target.uuid}"
            return None
        swaps = [s for s in self.devices.swaps() if s.uuid]
        if len(swaps) == 1:
            return f"UUID={swaps[0].uuid}"
        self.notes.append(
            f"resume={value} names nothing on this disk and the disk has "
            f"{len(swaps)} swap areas; left as it is"
        )
        return None


def rewrite(
    text: str, choose: Callable[[str, str], str | None]
) -> tuple[str, list[dict[str, str]]]:
    """``text`` with each argument ``choose`` has a new value for replaced."""
    replaced: list[dict[str, str]] = []

    def substitute(match: re.Match[str]) -> str:
        param, value = match.group("param"), match.group("value")
        new = choose(param, value)
        if new is None or new == value:
            return match.group(0)
        replaced.append({"param": param, "before": value, "after": new})
        return f"{param}={new}"

    return _ARGUMENT.sub(substitute, text), replaced
