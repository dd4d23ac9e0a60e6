"""Guest LVM volumes located by byte range, without device-mapper.

Activating a logical volume needs device-mapper; reading its metadata does
not. The LVM tools run here with ``--driverloaded n`` (never talk to
device-mapper), a device filter naming only the loop devices over the
guest's physical volumes (the host's own volume groups stay invisible, and guest
names that clash with the host's do no harm), a private ``LVM_SYSTEM_DIR``
(no host lvm.conf, no backup or archive files) and no hints, udev or D-Bus.
From the reports a linear logical volume becomes a byte range of the raw
disk: the physical volume's offset, plus its first extent's offset
(``pe_start``), plus the first extent number times the extent size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from h2k.guest import codes
from h2k.guest.volume import Volume
from h2k.tools.process import ToolResult, run_tool

TIMEOUT_SECONDS = 120.0
DEVICE_SETTINGS = (
    'use_devicesfile=0 hints="none" obtain_device_list_from_udev=0 scan_lvs=0'
)
OTHER_SETTINGS = (
    "global{notify_dbus=0 use_lvmpolld=0} "
    "activation{udev_sync=0 udev_rules=0 monitoring=0} "
    "backup{backup=0 archive=0}"
)
PV_FIELDS = "pv_name,pv_uuid,vg_name,vg_uuid,pe_start,vg_extent_size,pv_size"
LV_FIELDS = (
    "vg_name,lv_name,lv_uuid,lv_size,segtype,seg_start,seg_size,stripes,seg_pe_ranges"
)
UNKNOWN_DEVICE = "[unknown]"
_LOOP_DEVICE = re.compile(r"^/dev/loop\d+$")


@dataclass(frozen=True)
class PhysicalVolume:
    """An LVM physical volume on ``volume``; ``vg_name`` is empty if unused."""

    volume: Volume
    uuid: str
    vg_name: str
    vg_uuid: str
    pe_start: int
    extent_size: int


@dataclass(frozen=True)
class LogicalVolume:
    """A logical volume; ``volume`` is its byte range when a loop can show it.

    Only a linear volume whose extents follow each other on one physical
    volume of this disk has a byte range; for the others ``reason_code``
    (``LVM_NOT_LINEAR`` or ``LVM_PV_MISSING``) and ``reason`` say why not.
    """

    vg_name: str
    name: str
    uuid: str
    size: int
    segtype: str
    volume: Volume | None
    reason_code: str | None = None
    reason: str | None = None

    @property
    def path(self) -> str:
        return f"{self.vg_name}/{self.name}"


@dataclass(frozen=True)
class _Segment:
    start: int
    size: int
    segtype: str
    ranges: tuple[tuple[str, int, int], ...]


def lvm_env(system_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env["LVM_SYSTEM_DIR"] = system_dir
    env["LVM_SUPPRESS_FD_WARNINGS"] = "1"
    return env


def lvm_argv(
    command: str, devices: Sequence[str], *args: str, read_only: bool = True
) -> list[str]:
    """An LVM command that sees only ``devices`` and never uses device-mapper.

    The devices are named in a filter rather than with ``--devices``, which
    pvck of LVM 2.03.16 refuses ("device is not in devices list").
    """
    for device in devices:
        if not _LOOP_DEVICE.match(device):
            raise ValueError(f"not a loop device: {device!r}")
    accepted = ", ".join(f'"a|^{device}$|"' for device in devices)
    device_filter = f'[{accepted}, "r|.*|"]' if devices else '["r|.*|"]'
    config = (
        f"devices{{{DEVICE_SETTINGS} filter={device_filter} "
        f"global_filter={device_filter}}} {OTHER_SETTINGS}"
    )
    argv = [command, "--driverloaded", "n", "--nolocking", "--config", config]
    if read_only:
        argv.append("--readonly")
    return argv + list(args)


def run_lvm(
    command: str,
    devices: Sequence[str],
    *args: str,
    system_dir: str,
    read_only: bool = True,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> ToolResult:
    return run_tool(
        lvm_argv(command, devices, *args, read_only=read_only),
        env=lvm_env(system_dir),
        should_stop=should_stop,
        timeout=timeout,
    )


def _report(command: str, fields: str, key: str, **kwargs: Any) -> list[dict[str, str]]:
    devices = kwargs.pop("devices")
    result = run_lvm(
        command,
        devices,
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        fields,
        **kwargs,
    )
    rows: list[dict[str, str]] = []
    for report in json.loads(result.stdout).get("report", []):
        rows.extend(report.get(key, []))
    return rows


def parse_pe_ranges(text: str) -> tuple[tuple[str, int, int], ...]:
    """Read ``seg_pe_ranges`` (``"/dev/loop3:0-2 /dev/loop4:5-5"``)."""
    ranges = []
    for item in text.split():
        device, _, span = item.rpartition(":")
        first, _, last = span.partition("-")
        ranges.append((device, int(first), int(last)))
    return tuple(ranges)


def physical_volumes(
    rows: Sequence[Mapping[str, str]], volumes: Mapping[str, Volume]
) -> list[PhysicalVolume]:
    """Join the ``pvs`` report with the volume behind each loop device."""
    found = []
    for row in rows:
        volume = volumes.get(row["pv_name"])
        if volume is None:
            continue
        found.append(
            PhysicalVolume(
                volume=volume,
                uuid=row["pv_uuid"],
                vg_name=row.get("vg_name", ""),
                vg_uuid=row.get("vg_uuid", ""),
                pe_start=int(row.get("pe_start") or 0),
                extent_size=int(row.get("vg_extent_size") or 0),
            )
        )
    return found


def _locate(
    vg_name: str,
    name: str,
    segments: Sequence[_Segment],
    pvs: Mapping[str, PhysicalVolume],
) -> tuple[Volume | None, str | None, str | None]:
    odd = [s.segtype for s in segments if s.segtype != "linear"]
    if odd:
        return None, codes.LVM_NOT_LINEAR, f"{vg_name}/{name} is {odd[0]}"
    ranges = [r for s in segments for r in s.ranges]
    missing = [device for device, _, _ in ranges if device not in pvs]
    if missing or not ranges:
        return (
            None,
            codes.LVM_PV_MISSING,
            f"{vg_name}/{name} lies on a physical volume that is not on this disk",
        )
    device, first, last = ranges[0]
    for next_device, next_first, next_last in ranges[1:]:
        if next_device != device or next_first != last + 1:
            return (
                None,
                codes.LVM_NOT_LINEAR,
                f"{vg_name}/{name} is made of extents that do not follow each "
                "other on one physical volume",
            )
        last = next_last
    pv = pvs[device]
    offset = pv.volume.offset + pv.pe_start + first * pv.extent_size
    size = (last - first + 1) * pv.extent_size
    return Volume(f"lvm {vg_name}/{name}", offset, size), None, None


def logical_volumes(
    rows: Sequence[Mapping[str, str]], pvs: Mapping[str, PhysicalVolume]
) -> list[LogicalVolume]:
    """Turn the per-segment ``lvs`` report into logical volumes.

    ``pvs`` maps each loop device LVM reported to its physical volume.
    """
    grouped: dict[tuple[str, str], list[Mapping[str, str]]] = {}
    for row in rows:
        grouped.setdefault((row["vg_name"], row["lv_uuid"]), []).append(row)
    found = []
    for (vg_name, uuid), lv_rows in grouped.items():
        segments = sorted(
            (
                _Segment(
                    start=int(r["seg_start"]),
                    size=int(r["seg_size"]),
                    segtype=r["segtype"],
                    ranges=parse_pe_ranges(r.get("seg_pe_ranges", "")),
                )
                for r in lv_rows
            ),
            key=lambda s: s.start,
        )
        name = lv_rows[0]["lv_name"]
        size = int(lv_rows[0]["lv_size"])
        volume, code, reason = _locate(vg_name, name, segments, pvs)
        if volume is not None and volume.size != size:
            volume, code = None, codes.LVM_NOT_LINEAR
            reason = f"{vg_name}/{name}: its extents do not add up to its size"
        found.append(
            LogicalVolume(
                vg_name=vg_name,
                name=name,
                uuid=uuid,
                size=size,
                segtype=segments[0].segtype,
                volume=volume,
                reason_code=code,
                reason=reason,
            )
        )
    found.sort(key=lambda lv: (lv.vg_name, lv.name))
    return found


def read_lvm(
    loops: Mapping[str, Volume],
    *,
    system_dir: str,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> tuple[list[PhysicalVolume], list[LogicalVolume]]:
    """Read the volume groups on ``loops`` (loop device -> its volume)."""
    if not loops:
        return [], []
    devices = sorted(loops)
    common: dict[str, Any] = {
        "devices": devices,
        "system_dir": system_dir,
        "should_stop": should_stop,
        "timeout": timeout,
    }
    pv_rows = _report("pvs", PV_FIELDS, "pv", **common)
    pvs = physical_volumes(pv_rows, loops)
    by_device = dict(_by_device(pv_rows, pvs))
    lv_rows = _report("lvs", LV_FIELDS, "lv", **common)
    return pvs, logical_volumes(lv_rows, by_device)


def _by_device(
    rows: Sequence[Mapping[str, str]], pvs: Sequence[PhysicalVolume]
) -> list[tuple[str, PhysicalVolume]]:
    by_uuid = {pv.uuid: pv for pv in pvs}
    return [
        (row["pv_name"], by_uuid[row["pv_uuid"]])
        for row in rows
        if row["pv_uuid"] in by_uuid and row.get("vg_name")
    ]
