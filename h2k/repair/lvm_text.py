"""LVM's metadata text format, read well enough to trust a copy before using it.

pvck finds old copies of a volume group's metadata in the circular buffer of
a metadata area, but it does not say whether a copy is whole: a copy whose
bytes were overwritten may still carry a plausible ``seqno`` line. Parsing
the copy here (sections, assignments, strings, numbers, lists) and requiring
the fields a volume group needs is what makes it a *good* copy; the parsed
result also names the physical and logical volumes for the job's result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SECTOR_BYTES = 512
_TOKEN = re.compile(
    r"""
    (?P<space>[\s\x00]+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*")
    | (?P<number>-?\d+(?:\.\d+)?(?![\w.+-]))
    | (?P<name>[A-Za-z0-9_.+-]+)
    | (?P<punct>[{}\[\]=,])
    """,
    re.VERBOSE,
)
_ESCAPE = re.compile(r"\\(.)")


class MetadataTextError(ValueError):
    """The text is not a whole, well-formed volume group description."""


@dataclass(frozen=True)
class PvEntry:
    key: str
    id: str
    device_hint: str | None
    pe_start: int
    pe_count: int


@dataclass(frozen=True)
class LvEntry:
    name: str
    id: str
    size: int
    segtypes: tuple[str, ...]
    visible: bool


@dataclass(frozen=True)
class VgMetadata:
    """One volume group description; sizes in bytes, ``extent_size`` too."""

    name: str
    id: str
    seqno: int
    extent_size: int
    pvs: tuple[PvEntry, ...]
    lvs: tuple[LvEntry, ...]
    # When LVM wrote this copy (seconds since the epoch), if it says.
    written_at: int | None = None

    def pv_ids(self) -> set[str]:
        return {normal_uuid(pv.id) for pv in self.pvs}


def normal_uuid(uuid: str) -> str:
    """LVM prints UUIDs with and without dashes; compare them without."""
    return uuid.replace("-", "")


def dashed_uuid(uuid: str) -> str:
    """An undashed 32-character LVM UUID the way LVM prints it (6-4-4-4-4-4-6)."""
    plain = normal_uuid(uuid)
    if len(plain) != 32:
        return uuid
    cuts = (0, 6, 10, 14, 18, 22, 26, 32)
    return "-".join(plain[a:b] for a, b in zip(cuts, cuts[1:], strict=False))


def _tokens(text: str) -> list[tuple[str, str]]:
    found = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise MetadataTextError(
                f"unexpected character {text[position]!r} at byte {position}"
            )
        position = match.end()
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            found.append((kind, match.group()))
    return found


class _Parser:
    def __init__(self, text: str):
        self.tokens = _tokens(text)
        self.at = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise MetadataTextError("the text ends in the middle of a value")
        self.at += 1
        return token

    def expect(self, value: str) -> None:
        kind, found = self.take()
        if found != value or kind != "punct":
            raise MetadataTextError(f"expected {value!r}, found {found!r}")

    def section(self, closing: str | None) -> dict[str, Any]:
        values: dict[str, Any] = {}
        while True:
            token = self.peek()
            if token is None:
                if closing is not None:
                    raise MetadataTextError("a section is not closed")
                return values
            if token == ("punct", "}") and closing == "}":
                self.at += 1
                return values
            kind, name = self.take()
            if kind not in ("name", "number"):
                raise MetadataTextError(f"expected a name, found {name!r}")
            kind, found = self.take()
            if found == "{":
                values[name] = self.section("}")
            elif found == "=":
                values[name] = self.value()
            else:
                raise MetadataTextError(f"expected '=' or '{{' after {name!r}")

    def value(self) -> Any:
        kind, found = self.take()
        if kind == "string":
            return _ESCAPE.sub(r"\1", found[1:-1])
        if kind == "number":
            return float(found) if "." in found else int(found)
        if found == "[":
            items: list[Any] = []
            if self.peek() == ("punct", "]"):
                self.at += 1
                return items
            while True:
                items.append(self.value())
                kind, found = self.take()
                if found == "]":
                    return items
                if found != ",":
                    raise MetadataTextError(f"expected ',' or ']', found {found!r}")
        raise MetadataTextError(f"expected a value, found {found!r}")


def parse(text: str) -> dict[str, Any]:
    """The text as nested dicts: sections, and their values."""
    return _Parser(text).section(None)


def _int(section: dict[str, Any], key: str, where: str) -> int:
    value = section.get(key)
    if not isinstance(value, int):
        raise MetadataTextError(f"{where} has no whole number {key}")
    return value


def _str(section: dict[str, Any], key: str, where: str) -> str:
    value = section.get(key)
    if not isinstance(value, str) or not value:
        raise MetadataTextError(f"{where} has no {key}")
    return value


def _lv(name: str, section: dict[str, Any], extent_size: int) -> LvEntry:
    where = f"logical volume {name}"
    count = _int(section, "segment_count", where)
    extents = 0
    segtypes = []
    for number in range(1, count + 1):
        segment = section.get(f"segment{number}")
        if not isinstance(segment, dict):
            raise MetadataTextError(f"{where} lacks segment{number}")
        extents += _int(segment, "extent_count", f"{where} segment{number}")
        segtype = _str(segment, "type", f"{where} segment{number}")
        # What lvs calls linear is stored as a one-stripe striped segment.
        if segtype == "striped" and segment.get("stripe_count") == 1:
            segtype = "linear"
        segtypes.append(segtype)
    status = section.get("status")
    return LvEntry(
        name=name,
        id=_str(section, "id", where),
        size=extents * extent_size,
        segtypes=tuple(segtypes),
        visible=isinstance(status, list) and "VISIBLE" in status,
    )


def parse_vg(text: str) -> VgMetadata:
    """The volume group the text describes; MetadataTextError if it is not whole."""
    tree = parse(text)
    groups = [
        (name, value)
        for name, value in tree.items()
        if isinstance(value, dict) and "seqno" in value
    ]
    if len(groups) != 1:
        raise MetadataTextError(
            f"expected one volume group section, found {len(groups)}"
        )
    name, section = groups[0]
    where = f"volume group {name}"
    extent_size = _int(section, "extent_size", where) * SECTOR_BYTES
    pv_section = section.get("physical_volumes")
    if not isinstance(pv_section, dict) or not pv_section:
        raise MetadataTextError(f"{where} lists no physical volumes")
    pvs = []
    for key, pv in pv_section.items():
        if not isinstance(pv, dict):
            raise MetadataTextError(f"{where}: {key} is not a section")
        hint = pv.get("device")
        pvs.append(
            PvEntry(
                key=key,
                id=_str(pv, "id", f"{where} {key}"),
                device_hint=hint if isinstance(hint, str) else None,
                pe_start=_int(pv, "pe_start", f"{where} {key}") * SECTOR_BYTES,
                pe_count=_int(pv, "pe_count", f"{where} {key}"),
            )
        )
    lv_section = section.get("logical_volumes") or {}
    if not isinstance(lv_section, dict):
        raise MetadataTextError(f"{where}: logical_volumes is not a section")
    lvs = [
        _lv(lv_name, lv, extent_size)
        for lv_name, lv in lv_section.items()
        if isinstance(lv, dict)
    ]
    written_at = tree.get("creation_time")
    return VgMetadata(
        name=name,
        id=_str(section, "id", where),
        seqno=_int(section, "seqno", where),
        extent_size=extent_size,
        pvs=tuple(pvs),
        lvs=tuple(lvs),
        written_at=written_at if isinstance(written_at, int) else None,
    )
