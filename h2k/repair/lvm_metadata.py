"""LVM metadata on a guest's physical volumes, as pvck sees it, without device-mapper.

An LVM physical volume keeps its volume group's metadata as text in one or
two metadata areas: a header sector (``mda_header``) pointing at the current
copy, then a circular buffer that still holds earlier copies. pvck (LVM
2.03.16) can print the headers and the problems it finds in them
(``--dump headers``, ``CHECK:`` lines), list every copy a metadata area still
holds even when its header is gone (``--dump metadata_search``), save one
copy to a file (``--settings metadata_offset=``), and write a copy back as the
current metadata of every area of a PV (``--repairtype metadata``). vgck
checks a whole volume group and vgcfgbackup writes its metadata as a backup
file.

Every command runs through :func:`h2k.guest.lvm.lvm_argv`: only the loop
devices over this guest's physical volumes are visible, device-mapper is
never used, and no host configuration, backup or archive is touched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from h2k.errors import ToolError
from h2k.guest.lvm import lvm_argv, lvm_env
from h2k.repair import lvm_text
from h2k.repair.lvm_text import MetadataTextError, VgMetadata
from h2k.tools.process import ToolResult, run_tool

log = logging.getLogger(__name__)

_UUID = re.compile(r"^\s*pv_header\.pv_uuid (\S+)", re.MULTILINE)
_LOCATION = re.compile(r"^\s*pv_header\.disk_locn\[(\d+)\] at \d+ # (.+)$")
_LOCATION_FIELD = re.compile(r"^\s*pv_header\.disk_locn\[(\d+)\]\.(offset|size) (\d+)")
_MDA_HEADER = re.compile(r"^\s*mda_header_(\d+) at \d+")
_CURRENT_TEXT = re.compile(
    r"^\s*metadata text at (\d+) crc \S+ # vgname (\S+) seqno (\d+)"
)
_CHECK = re.compile(r"^\s*CHECK: (.+)$")
_CHECK_AREA = re.compile(r"mda_header_(\d+)")
_CHECK_TEXT = re.compile(r"metadata text at (\d+)")
_COPY = re.compile(
    r"metadata at (\d+) length (\d+) crc ([0-9a-fA-Fx]+) vg (\S+) seqno (\d+) id (\S+)"
)
_PARSE_ERROR = re.compile(r"parse error for metadata at (\d+)")
_AREA_KIND = "location of metadata area"


@dataclass
class MetadataArea:
    """One metadata area of a PV: where it is and what its header says is current."""

    number: int
    offset: int
    size: int
    current_offset: int | None = None
    current_vg: str | None = None
    current_seqno: int | None = None
    problems: list[str] = field(default_factory=list)

    def holds(self, offset: int) -> bool:
        return self.offset <= offset < self.offset + self.size


@dataclass
class PvHeaders:
    """What ``pvck --dump headers`` says about one physical volume."""

    device: str
    uuid: str
    exit_code: int
    areas: list[MetadataArea]
    # Problems with the label or PV header, not tied to one metadata area.
    problems: list[str]

    @property
    def damaged(self) -> bool:
        return bool(
            self.exit_code or self.problems or any(a.problems for a in self.areas)
        )

    def all_problems(self) -> list[str]:
        return self.problems + [p for a in self.areas for p in a.problems]


@dataclass(frozen=True)
class MetadataCopy:
    """A copy of volume group metadata found in a metadata area.

    ``current`` says the area's header points at it; ``trusted`` that it is
    the current copy of an area pvck found nothing wrong with, which makes
    it committed metadata rather than an earlier version or a write that
    never completed.
    """

    device: str
    pv_uuid: str
    area: int
    offset: int
    length: int
    vg_name: str
    vg_id: str
    seqno: int
    parse_error: bool
    current: bool
    trusted: bool


def parse_headers(device: str, exit_code: int, text: str) -> PvHeaders:
    """Read the output of ``pvck --dump headers`` (standard output)."""
    uuid_match = _UUID.search(text)
    kinds: dict[int, str] = {}
    fields: dict[int, dict[str, int]] = {}
    areas: dict[int, MetadataArea] = {}
    checks: list[str] = []
    current: MetadataArea | None = None
    for line in text.splitlines():
        if match := _LOCATION.match(line):
            kinds[int(match[1])] = match[2].strip()
        elif match := _LOCATION_FIELD.match(line):
            fields.setdefault(int(match[1]), {})[match[2]] = int(match[3])
        elif match := _MDA_HEADER.match(line):
            current = areas.setdefault(int(match[1]), MetadataArea(int(match[1]), 0, 0))
        elif (match := _CURRENT_TEXT.match(line)) and current is not None:
            current.current_offset = int(match[1])
            current.current_vg = None if match[2] == "?" else match[2]
            current.current_seqno = int(match[3]) or None
        elif match := _CHECK.match(line):
            checks.append(match[1].strip())
    located = [
        fields.get(index, {})
        for index, kind in sorted(kinds.items())
        if kind == _AREA_KIND and fields.get(index, {}).get("offset")
    ]
    for number, where in enumerate(located, start=1):
        area = areas.setdefault(number, MetadataArea(number, 0, 0))
        area.offset = where["offset"]
        area.size = where.get("size", 0)
    ordered = [areas[n] for n in sorted(areas) if areas[n].offset]
    problems = []
    for check in checks:
        owner = _owner(check, ordered)
        if owner is None:
            problems.append(check)
        else:
            owner.problems.append(check)
    return PvHeaders(
        device=device,
        uuid=lvm_text.normal_uuid(uuid_match[1]) if uuid_match else "",
        exit_code=exit_code,
        areas=ordered,
        problems=problems,
    )


def _owner(check: str, areas: Sequence[MetadataArea]) -> MetadataArea | None:
    if match := _CHECK_AREA.search(check):
        number = int(match[1])
        return next((a for a in areas if a.number == number), None)
    if match := _CHECK_TEXT.search(check):
        offset = int(match[1])
        return next((a for a in areas if a.holds(offset)), None)
    return None


def parse_copies(
    headers: PvHeaders, area: MetadataArea, stdout: str, stderr: str
) -> list[MetadataCopy]:
    """Read ``pvck --dump metadata_search`` of one area into copies."""
    unparsable = {int(m[1]) for m in _PARSE_ERROR.finditer(stderr)}
    found = []
    for match in _COPY.finditer(stdout):
        offset = int(match[1])
        is_current = offset == area.current_offset
        found.append(
            MetadataCopy(
                device=headers.device,
                pv_uuid=headers.uuid,
                area=area.number,
                offset=offset,
                length=int(match[2]),
                vg_name=match[4],
                vg_id=match[6],
                seqno=int(match[5]),
                parse_error=offset in unparsable,
                current=is_current,
                trusted=is_current
                and not area.problems
                and area.current_seqno == int(match[5]),
            )
        )
    return found


@dataclass
class LvmTools:
    """The LVM commands of one job, over the loop devices of its PVs."""

    devices: Sequence[str]
    system_dir: str
    should_stop: Callable[[], bool] | None
    timeout: Callable[[], float]

    def run(self, command: str, *args: str, read_only: bool = False) -> ToolResult:
        return run_tool(
            lvm_argv(command, self.devices, *args, read_only=read_only),
            env=lvm_env(self.system_dir),
            should_stop=self.should_stop,
            timeout=self.timeout(),
            check=False,
        )

    def headers(self, device: str) -> PvHeaders:
        result = self.run("pvck", "--dump", "headers", device)
        headers = parse_headers(device, result.returncode, result.stdout)
        if not headers.uuid:
            raise ToolError("pvck", result.args, result.returncode, result.stderr)
        return headers

    def copies(self, headers: PvHeaders) -> list[MetadataCopy]:
        """Every copy each metadata area of the PV still holds."""
        found = []
        for area in headers.areas:
            result = self.run(
                "pvck",
                "--dump",
                "metadata_search",
                "--settings",
                f"mda_num={area.number}",
                headers.device,
            )
            if result.returncode != 0:
                log.warning(
                    "pvck found no metadata in area %s of %s: %s",
                    area.number,
                    headers.device,
                    result.stderr.strip()[-300:],
                )
                continue
            found.extend(parse_copies(headers, area, result.stdout, result.stderr))
        return found

    def save(self, copy: MetadataCopy, path: str) -> VgMetadata | None:
        """Save ``copy`` to ``path``; its description if it is whole, else None."""
        result = self.run(
            "pvck",
            "--dump",
            "metadata_search",
            "--settings",
            f"mda_num={copy.area} metadata_offset={copy.offset}",
            "--file",
            path,
            copy.device,
        )
        if result.returncode != 0:
            return None
        try:
            with open(path, encoding="utf-8", errors="strict") as f:
                metadata = lvm_text.parse_vg(f.read())
        except (OSError, UnicodeDecodeError, MetadataTextError) as exc:
            log.info("copy at %s of %s is not whole: %s", copy.offset, copy.device, exc)
            return None
        if metadata.id != copy.vg_id or metadata.seqno != copy.seqno:
            return None
        return metadata

    def restore(self, headers: PvHeaders, path: str) -> ToolResult:
        """Write the metadata in ``path`` as the current copy of every area.

        Only the metadata areas are rewritten; the PV header, which says
        where they are, must be intact.
        """
        return self.run(
            "pvck",
            "--repairtype",
            "metadata",
            "--yes",
            "--file",
            path,
            "--settings",
            f"pv_uuid={headers.uuid}",
            headers.device,
        )

    def vgck(self, vg_name: str) -> ToolResult:
        return self.run("vgck", vg_name)

    def backup(self, vg_name: str, path: str) -> ToolResult:
        return self.run("vgcfgbackup", "--file", path, vg_name, read_only=True)
