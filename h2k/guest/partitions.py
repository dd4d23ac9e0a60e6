"""The guest's partition table (MBR or GPT), read with ``sfdisk --json``.

sfdisk reads the table of a plain file and never writes when it only lists,
so it runs on the raw view of the disk. Offsets are turned into bytes here,
once, because every later step (blkid, LVM, loop devices) works in bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from h2k.errors import ToolError
from h2k.guest.volume import Volume
from h2k.tools.process import run_tool

TIMEOUT_SECONDS = 60.0
# MBR types of extended partitions: containers of logical partitions, which
# hold no filesystem themselves.
EXTENDED_TYPES = frozenset({"5", "f", "85"})
_NO_TABLE = "does not contain a recognized partition table"
_TRAILING_NUMBER = re.compile(r"(\d+)$")


@dataclass(frozen=True)
class Partition:
    """One partition, in bytes.

    ``type`` is the GPT type GUID or the MBR type byte in hex (``"83"``);
    ``uuid`` is the GPT partition GUID, or for MBR what the kernel and blkid
    call its PARTUUID (``"<disk id>-<number>"``); ``name`` is the GPT name.
    """

    number: int
    start: int
    size: int
    type: str
    uuid: str | None
    name: str | None
    bootable: bool = False

    @property
    def is_extended(self) -> bool:
        return self.type.lower() in EXTENDED_TYPES

    @property
    def volume(self) -> Volume:
        return Volume(f"partition {self.number}", self.start, self.size)


@dataclass(frozen=True)
class PartitionTable:
    """``label`` is ``"gpt"`` or ``"dos"`` (MBR); ``id`` the disk GUID or id."""

    label: str
    id: str | None
    sector_size: int
    partitions: tuple[Partition, ...]


def _number(node: str, device: str) -> int:
    suffix = node[len(device) :] if node.startswith(device) else node
    match = _TRAILING_NUMBER.search(suffix)
    if match is None:
        raise ValueError(f"sfdisk names a partition {node!r} without a number")
    return int(match.group(1))


def _mbr_partuuid(disk_id: str | None, number: int) -> str | None:
    if not disk_id:
        return None
    hex_id = disk_id.lower().removeprefix("0x")
    return f"{int(hex_id, 16):08x}-{number:02x}"


def parse_sfdisk(text: str) -> PartitionTable:
    """Read the output of ``sfdisk --json`` into a :class:`PartitionTable`."""
    table: dict[str, Any] = json.loads(text)["partitiontable"]
    label = str(table["label"])
    sector = int(table.get("sectorsize", 512))
    device = str(table.get("device", ""))
    disk_id = table.get("id")
    partitions = []
    for row in table.get("partitions", []):
        number = _number(str(row["node"]), device)
        uuid = row.get("uuid")
        if uuid is None and label == "dos":
            uuid = _mbr_partuuid(disk_id, number)
        partitions.append(
            Partition(
                number=number,
                start=int(row["start"]) * sector,
                size=int(row["size"]) * sector,
                type=str(row["type"]),
                uuid=uuid,
                name=row.get("name"),
                bootable=bool(row.get("bootable", False)),
            )
        )
    partitions.sort(key=lambda p: p.number)
    return PartitionTable(label, disk_id, sector, tuple(partitions))


def read_partition_table(
    raw_path: str,
    *,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> PartitionTable | None:
    """The partition table of ``raw_path``, None when it has none."""
    result = run_tool(
        ["sfdisk", "--json", raw_path],
        should_stop=should_stop,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        if _NO_TABLE in result.stderr:
            return None
        raise ToolError("sfdisk", result.args, result.returncode, result.stderr)
    return parse_sfdisk(result.stdout)
