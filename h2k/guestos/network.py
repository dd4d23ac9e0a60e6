"""Network configuration pinned to the old virtual NIC's MAC address.

A VMware guest's network configuration often applies only to the NIC with
VMware's MAC address (``00:50:56:...``); under KVM the NIC has another
address, the configuration matches nothing, and the guest comes up without
network. Each configuration system pins it its own way, and each is
unpinned here the way that keeps the rest of its file intact:

- ifcfg (RHEL, SUSE): ``HWADDR=`` and ``MACADDR=`` lines removed;
- NetworkManager keyfiles: ``mac-address=`` removed;
- netplan: ``match: macaddress`` removed (:mod:`h2k.guestos.netplan`);
- systemd-networkd: ``MACAddress=`` removed from ``[Match]`` of a
  ``.network`` file (``Name=e*`` put in when nothing else is matched, as an
  empty ``[Match]`` would match every interface, the loopback too); a
  ``.link`` file that matches only a MAC exists to pin a name to that NIC
  and is removed;
- udev's persistent-net rules (names bound to MACs): the file is removed;
- ifupdown ``/etc/network/interfaces``: ``hwaddress`` lines removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from h2k.guestos import changes, netplan
from h2k.guestos.changes import Change, FixPlan
from h2k.guestos.tree import GuestTree

IFCFG_DIRS = ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network")
NM_DIR = "/etc/NetworkManager/system-connections"
NETPLAN_DIR = "/etc/netplan"
NETWORKD_DIR = "/etc/systemd/network"
UDEV_RULES_DIR = "/etc/udev/rules.d"
INTERFACES = "/etc/network/interfaces"
INTERFACES_DIR = "/etc/network/interfaces.d"
NETWORKD_NAME_GLOB = "e*"

_MAC = r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}"
_IFCFG_MAC = re.compile(
    r"^\s*(?:export\s+)?(HWADDR|MACADDR)\s*=\s*[\"']?(" + _MAC + ")"
)
_NM_MAC = re.compile(r"^\s*mac-address\s*=\s*(" + _MAC + ")")
_NETWORKD_MAC = re.compile(r"^\s*(MACAddress|PermanentMACAddress)\s*=\s*(.*)$")
_SECTION = re.compile(r"^\s*\[([^\]]+)\]\s*$")
_UDEV_MAC = re.compile(r"ATTRS?\{address\}==\"(" + _MAC + r")\"")
_HWADDRESS = re.compile(r"^\s*hwaddress\s+(?:ether\s+)?(" + _MAC + ")")
_ANY_MAC = re.compile(_MAC)
# Kinds unpinned by dropping lines: the pattern, and what the lines are called.
_PINNING_LINES = {
    "ifcfg": (_IFCFG_MAC, "HWADDR/MACADDR"),
    "networkmanager": (_NM_MAC, "mac-address"),
    "ifupdown": (_HWADDRESS, "hwaddress"),
}


@dataclass
class ConfigFile:
    """A network configuration file and the MAC addresses pinning it."""

    path: str
    kind: str
    macs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "mac_pinned": bool(self.macs),
            "mac_addresses": [m.lower() for m in self.macs],
        }


def _sections(text: str) -> list[tuple[str | None, str]]:
    """Each line of an INI-style file with the section it is in."""
    section = None
    found = []
    for line in text.splitlines(keepends=True):
        match = _SECTION.match(line)
        if match:
            section = match.group(1).strip()
        found.append((section, line))
    return found


def _ifcfg_files(tree: GuestTree) -> list[str]:
    found = []
    for directory in IFCFG_DIRS:
        for path in tree.files(directory):
            name = path.rsplit("/", 1)[1]
            if name.startswith("ifcfg-") and name != "ifcfg-lo":
                found.append(path)
    return found


def _udev_files(tree: GuestTree) -> list[str]:
    return [p for p in tree.files(UDEV_RULES_DIR, ".rules") if "persistent-net" in p]


def _interfaces_files(tree: GuestTree) -> list[str]:
    found = [INTERFACES] if tree.is_file(INTERFACES) else []
    return found + tree.files(INTERFACES_DIR)


def _lines_macs(text: str, pattern: re.Pattern[str], group: int) -> list[str]:
    return [m.group(group) for line in text.splitlines() if (m := pattern.match(line))]


def _networkd_macs(text: str) -> list[str]:
    macs = []
    for section, line in _sections(text):
        match = _NETWORKD_MAC.match(line)
        if section == "Match" and match:
            macs += _ANY_MAC.findall(match.group(2))
    return macs


def find(tree: GuestTree) -> list[ConfigFile]:
    """Every network configuration file of the kinds above, pinned or not."""
    found: list[ConfigFile] = []

    def add(paths: list[str], kind: str, macs: Callable[[str], list[str]]) -> None:
        for path in paths:
            text = tree.read_text(path)
            if text is not None:
                found.append(ConfigFile(path, kind, macs(text)))

    add(_ifcfg_files(tree), "ifcfg", lambda t: _lines_macs(t, _IFCFG_MAC, 2))
    add(tree.files(NM_DIR), "networkmanager", lambda t: _lines_macs(t, _NM_MAC, 1))
    add(
        tree.files(NETPLAN_DIR, ".yaml") + tree.files(NETPLAN_DIR, ".yml"),
        "netplan",
        netplan.pinned_macs,
    )
    add(tree.files(NETWORKD_DIR, ".network"), "networkd", _networkd_macs)
    add(tree.files(NETWORKD_DIR, ".link"), "networkd-link", _networkd_macs)
    add(_udev_files(tree), "udev-persistent-net", _UDEV_MAC.findall)
    add(_interfaces_files(tree), "ifupdown", lambda t: _lines_macs(t, _HWADDRESS, 1))
    return found


def describe(tree: GuestTree) -> dict[str, Any]:
    files = find(tree)
    return {
        "files": [f.as_dict() for f in files],
        "mac_pinned": any(f.macs for f in files),
    }


def _drop_lines(text: str, pattern: re.Pattern[str]) -> str:
    return "".join(
        line for line in text.splitlines(keepends=True) if not pattern.match(line)
    )


def _unpin_networkd(text: str) -> tuple[str, bool]:
    """``text`` without MAC matches; true when ``Name=`` had to be put in."""
    out: list[str] = []
    match_header = None
    match_keys = 0
    for section, line in _sections(text):
        if _SECTION.match(line) and section == "Match":
            match_header = len(out)
            match_keys = 0
        if section == "Match" and _NETWORKD_MAC.match(line):
            continue
        if (
            section == "Match"
            and "=" in line
            and not line.lstrip().startswith(("#", ";"))
        ):
            match_keys += 1
        out.append(line)
    if match_header is not None and match_keys == 0:
        out.insert(match_header + 1, f"Name={NETWORKD_NAME_GLOB}\n")
        return "".join(out), True
    return "".join(out), False


def _link_matches_only_mac(text: str) -> bool:
    keys = [
        line.split("=", 1)[0].strip()
        for section, line in _sections(text)
        if section == "Match" and "=" in line and not line.lstrip().startswith("#")
    ]
    return bool(keys) and all(k in ("MACAddress", "PermanentMACAddress") for k in keys)


def _change_for(
    tree: GuestTree, config: ConfigFile, text: str
) -> tuple[Change | None, list[str]]:
    macs = ", ".join(m.lower() for m in config.macs)
    if config.kind in _PINNING_LINES:
        pattern, what = _PINNING_LINES[config.kind]
        after = _drop_lines(text, pattern)
        return changes.modify(config.path, text, after, f"{what} {macs} removed"), []
    if config.kind == "udev-persistent-net":
        summary = f"removed: it binds interface names to {macs}"
        return changes.remove_file(tree, config.path, summary), []
    if config.kind == "networkd-link" and _link_matches_only_mac(text):
        summary = f"removed: it only pins an interface name to {macs}"
        return changes.remove_file(tree, config.path, summary), []
    if config.kind in ("networkd", "networkd-link"):
        after, named = _unpin_networkd(text)
        note = []
        if named:
            note.append(
                f"{config.path}: [Match] held only the MAC address; it now "
                f"matches Name={NETWORKD_NAME_GLOB}"
            )
        summary = f"MACAddress {macs} removed"
        return changes.modify(config.path, text, after, summary), note
    rewritten = netplan.unpin(text)
    if rewritten is None:
        return None, [f"{config.path}: not plain block YAML; left as it is"]
    summary = f"match on {macs} removed"
    return changes.modify(config.path, text, rewritten.text, summary), [
        f"{config.path}: {note}" for note in rewritten.notes
    ]


def plan(tree: GuestTree) -> FixPlan:
    """Remove every MAC pinning found."""
    result = FixPlan("network")
    files = find(tree)
    result.found["files"] = [f.as_dict() for f in files]
    for config in files:
        if not config.macs:
            continue
        text = tree.read_text(config.path)
        if text is None:
            continue
        change, notes = _change_for(tree, config, text)
        result.notes += notes
        if change is not None and (change.action != "modify" or change.after != text):
            result.changes.append(change)
    if not files:
        result.notes.append("no network configuration files were found")
    return result
