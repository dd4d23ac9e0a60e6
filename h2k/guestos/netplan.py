"""netplan YAML: find and remove matches on a MAC address, keeping comments.

A netplan file is YAML, and the guest's administrator wrote it, so it is
edited by lines rather than loaded and dumped again (which would drop
comments and reorder keys). The edit only ever removes the ``macaddress``
key under an interface's ``match`` (block or flow style) and, when that
leaves the match empty, either matches by name instead (``name: "e*"``,
when the interface is the only one of its file: the single NIC of a small
VM comes back under any name) or drops the match and its ``set-name`` (which
netplan refuses without a match), so the result is still valid netplan.

Only block mappings indented with spaces and one-line flow mappings are
understood; a file written otherwise is reported and left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEVICE_TYPES = ("ethernets", "wifis")
NAME_GLOB = '"e*"'
_KEY_LINE = re.compile(
    r"^(?P<indent> *)(?P<item>- +)?(?P<key>[A-Za-z0-9_.-]+|\"[^\"]*\"|'[^']*')"
    r"\s*:(?:\s+(?P<value>.*?))?\s*$"
)
_FLOW_ITEM = re.compile(r"^\s*(?P<key>[A-Za-z0-9_-]+)\s*:\s*(?P<value>.*?)\s*$")


@dataclass
class _Node:
    index: int
    indent: int
    key: str
    value: str
    path: tuple[str, ...]


def _strip_comment(value: str) -> str:
    if value.startswith(("'", '"')):
        return value
    return re.split(r"\s+#", value, maxsplit=1)[0].strip()


def _nodes(lines: list[str]) -> list[_Node] | None:
    """The mapping keys of ``lines`` with their paths; None if tabs are used."""
    nodes = []
    stack: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        if body.startswith("\t") or body.lstrip(" ").startswith("\t"):
            return None
        match = _KEY_LINE.match(body)
        indent = len(body) - len(body.lstrip(" "))
        if match is None:
            while stack and stack[-1][0] > indent:
                stack.pop()
            continue
        if match.group("item"):
            indent += len(match.group("item"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = match.group("key").strip("\"'")
        path = tuple(k for _, k in stack) + (key,)
        stack.append((indent, key))
        value = _strip_comment(match.group("value") or "")
        nodes.append(_Node(index, indent, key, value, path))
    return nodes


def _is_match(node: _Node) -> bool:
    return (
        len(node.path) == 4
        and node.path[0] == "network"
        and node.path[1] in DEVICE_TYPES
        and node.path[3] == "match"
    )


def _flow_items(value: str) -> list[tuple[str, str]] | None:
    inner = value.strip()
    if not (inner.startswith("{") and inner.endswith("}")):
        return None
    items = []
    for part in inner[1:-1].split(","):
        if not part.strip():
            continue
        match = _FLOW_ITEM.match(part)
        if match is None:
            return None
        items.append((match.group("key"), match.group("value")))
    return items


def _unquote(value: str) -> str:
    return value.strip().strip("\"'")


def pinned_macs(text: str) -> list[str]:
    """The MAC addresses interfaces of this file are matched by."""
    lines = text.splitlines(keepends=True)
    nodes = _nodes(lines) or []
    found = []
    for node in nodes:
        if node.key == "macaddress" and _is_match_child(node):
            found.append(_unquote(node.value))
        elif _is_match(node) and node.value:
            for key, value in _flow_items(node.value) or []:
                if key == "macaddress":
                    found.append(_unquote(value))
    return found


def _is_match_child(node: _Node) -> bool:
    return (
        len(node.path) == 5
        and node.path[0] == "network"
        and node.path[1] in DEVICE_TYPES
        and node.path[3] == "match"
    )


@dataclass(frozen=True)
class Rewrite:
    text: str
    notes: list[str]


def unpin(text: str) -> Rewrite | None:
    """``text`` without MAC matches; None when it cannot be edited safely."""
    lines = text.splitlines(keepends=True)
    nodes = _nodes(lines)
    if nodes is None:
        return None
    notes: list[str] = []
    drop: set[int] = set()
    replace: dict[int, str] = {}
    for match in [n for n in nodes if _is_match(n)]:
        device_type, interface = match.path[1], match.path[2]
        siblings = [
            n for n in nodes if len(n.path) == 3 and n.path[:2] == match.path[:2]
        ]
        children = [
            n
            for n in nodes
            if len(n.path) == 5 and n.path[:4] == match.path and n.index > match.index
        ]
        newline = "\n" if lines[match.index].endswith("\n") else ""
        pad = " " * match.indent
        if match.value:
            items = _flow_items(match.value)
            if items is None or not any(k == "macaddress" for k, _ in items):
                continue
            kept = [(k, v) for k, v in items if k != "macaddress"]
            if kept:
                inner = ", ".join(f"{k}: {v}" for k, v in kept)
                replace[match.index] = f"{pad}match: {{{inner}}}{newline}"
                notes.append(f"{interface}: the match on its MAC address was removed")
                continue
            empty = True
        else:
            macs = [c for c in children if c.key == "macaddress"]
            if not macs:
                continue
            drop.update(c.index for c in macs)
            empty = len(macs) == len(children)
        if not empty:
            notes.append(f"{interface}: the match on its MAC address was removed")
            continue
        if len(siblings) == 1:
            if match.value:
                by_name = f"{pad}match: {{name: {NAME_GLOB}}}{newline}"
            else:
                child_pad = " " * children[0].indent
                by_name = f"{pad}match:{newline}{child_pad}name: {NAME_GLOB}{newline}"
            replace[match.index] = by_name
            notes.append(
                f"{interface}: matched by MAC address before, now by name "
                f"{NAME_GLOB} (the only {device_type} entry of the file)"
            )
            continue
        drop.add(match.index)
        set_names = [
            n
            for n in nodes
            if len(n.path) == 4 and n.path[:3] == match.path[:3] and n.key == "set-name"
        ]
        drop.update(n.index for n in set_names)
        notes.append(
            f"{interface}: its match on a MAC address was dropped"
            + (" with its set-name" if set_names else "")
            + f"; the entry now applies to the interface named {interface}"
        )
    if not drop and not replace:
        return Rewrite(text, [])
    out = []
    for index, line in enumerate(lines):
        if index in drop:
            continue
        out.append(replace.get(index, line))
    return Rewrite("".join(out), notes)
