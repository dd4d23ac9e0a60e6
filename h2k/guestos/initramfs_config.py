"""Virtio drivers in the guest's initramfs configuration.

A VMware guest boots from a disk behind VMware's SCSI or SATA controller,
and its initramfs (built "host-only" by default) holds just those drivers.
Under KVM the root disk sits behind virtio, and an initramfs without
virtio_blk/virtio_scsi cannot find it. Each initramfs tool is told to
include the virtio drivers in its own way:

- dracut: a drop-in ``/etc/dracut.conf.d/h2k-virtio.conf`` with
  ``add_drivers+=" ... "``;
- initramfs-tools (update-initramfs): lines in /etc/initramfs-tools/modules,
  unless ``MODULES=most`` already takes every storage and network driver;
- mkinitcpio: names added to ``MODULES=(...)`` in /etc/mkinitcpio.conf.

This only changes the configuration; the images are rebuilt from it by
initramfs_regenerate (or by the guest's next kernel update).
"""

from __future__ import annotations

import re
from typing import Any

from h2k.guestos import changes
from h2k.guestos.changes import FixPlan
from h2k.guestos.tree import GuestTree

DRACUT = "dracut"
INITRAMFS_TOOLS = "update-initramfs"
MKINITCPIO = "mkinitcpio"
# Where each tool lives in a guest, in order of preference.
TOOLS: dict[str, tuple[str, ...]] = {
    DRACUT: ("/usr/bin/dracut", "/usr/sbin/dracut", "/bin/dracut", "/sbin/dracut"),
    INITRAMFS_TOOLS: (
        "/usr/sbin/update-initramfs",
        "/sbin/update-initramfs",
        "/usr/bin/update-initramfs",
    ),
    MKINITCPIO: ("/usr/bin/mkinitcpio", "/usr/sbin/mkinitcpio", "/bin/mkinitcpio"),
}
PREFERRED = {
    "rhel": DRACUT,
    "suse": DRACUT,
    "debian": INITRAMFS_TOOLS,
    "arch": MKINITCPIO,
}
VIRTIO_MODULES = ("virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci")

DRACUT_CONF = "/etc/dracut.conf"
DRACUT_DIRS = ("/etc/dracut.conf.d", "/usr/lib/dracut/dracut.conf.d")
H2K_DRACUT_CONF = "/etc/dracut.conf.d/h2k-virtio.conf"
INITRAMFS_CONF = "/etc/initramfs-tools/initramfs.conf"
INITRAMFS_CONF_DIR = "/etc/initramfs-tools/conf.d"
INITRAMFS_MODULES = "/etc/initramfs-tools/modules"
MKINITCPIO_CONF = "/etc/mkinitcpio.conf"
MKINITCPIO_DIR = "/etc/mkinitcpio.conf.d"

_DRACUT_DRIVERS = re.compile(
    r"^\s*(?:add_drivers|force_drivers|drivers)\s*\+?=\s*([\"']?)(.*?)\1\s*(?:#.*)?$"
)
_DRACUT_HOSTONLY = re.compile(r"^\s*hostonly\s*=\s*[\"']?(\w+)")
_SHELL_ASSIGN = re.compile(r"^\s*([A-Z_]+)\s*=\s*(.*?)\s*(?:#.*)?$")
_ARRAY = re.compile(r"^\s*(?P<name>MODULES|HOOKS)\s*=\s*(?P<value>\(.*?\)|\".*?\"|\S*)")


def _normal(module: str) -> str:
    return module.replace("-", "_")


def tools(tree: GuestTree) -> list[dict[str, str]]:
    """The initramfs tools installed in the guest, with where they are."""
    found = []
    for name, paths in TOOLS.items():
        path = next((p for p in paths if tree.is_file(p)), None)
        if path is not None:
            found.append({"name": name, "path": path})
    return found


def choose_tool(tree: GuestTree, family: str | None) -> str | None:
    """The tool that builds this guest's initramfs; the family's, if it has it."""
    names = [t["name"] for t in tools(tree)]
    preferred = PREFERRED.get(family or "")
    if preferred in names:
        return preferred
    return names[0] if names else None


def _dracut_files(tree: GuestTree) -> list[str]:
    files = [DRACUT_CONF] if tree.is_file(DRACUT_CONF) else []
    for directory in DRACUT_DIRS:
        files += tree.files(directory, ".conf")
    return files


def _dracut_state(tree: GuestTree) -> dict[str, Any]:
    named: set[str] = set()
    hostonly = None
    files = _dracut_files(tree)
    for path in files:
        for line in (tree.read_text(path) or "").splitlines():
            if match := _DRACUT_DRIVERS.match(line):
                named.update(_normal(m) for m in match.group(2).split())
            elif match := _DRACUT_HOSTONLY.match(line):
                hostonly = match.group(1).lower()
    return {
        "config_files": files,
        "named": named,
        "hostonly": hostonly,
        "covered_by": None,
    }


def _shell_values(tree: GuestTree, paths: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for path in paths:
        for line in (tree.read_text(path) or "").splitlines():
            if match := _SHELL_ASSIGN.match(line):
                values[match.group(1)] = match.group(2).strip("\"'")
    return values


def _initramfs_tools_state(tree: GuestTree) -> dict[str, Any]:
    conf_files = [p for p in [INITRAMFS_CONF] if tree.is_file(p)]
    conf_files += tree.files(INITRAMFS_CONF_DIR)
    mode = _shell_values(tree, conf_files).get("MODULES", "most")
    named = set()
    for line in (tree.read_text(INITRAMFS_MODULES) or "").splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            named.add(_normal(words[0]))
    files = conf_files + (
        [INITRAMFS_MODULES] if tree.is_file(INITRAMFS_MODULES) else []
    )
    return {
        "config_files": files,
        "named": named,
        "modules_policy": mode,
        "covered_by": "MODULES=most" if mode == "most" else None,
    }


def _array_words(value: str) -> list[str]:
    return value.strip().strip("()\"'").split()


def _mkinitcpio_state(tree: GuestTree) -> dict[str, Any]:
    files = [p for p in [MKINITCPIO_CONF] if tree.is_file(p)]
    files += tree.files(MKINITCPIO_DIR, ".conf")
    named: set[str] = set()
    hooks: list[str] = []
    for path in files:
        for line in (tree.read_text(path) or "").splitlines():
            if match := _ARRAY.match(line):
                words = _array_words(match.group("value"))
                if match.group("name") == "MODULES":
                    named = {_normal(w) for w in words}
                else:
                    hooks = words
    covered = (
        "HOOKS without autodetect" if hooks and "autodetect" not in hooks else None
    )
    return {
        "config_files": files,
        "named": named,
        "hooks": hooks,
        "covered_by": covered,
    }


_STATES = {
    DRACUT: _dracut_state,
    INITRAMFS_TOOLS: _initramfs_tools_state,
    MKINITCPIO: _mkinitcpio_state,
}


def describe(tree: GuestTree, family: str | None) -> dict[str, Any]:
    """The tool, and which virtio drivers its configuration includes."""
    tool = choose_tool(tree, family)
    found: dict[str, Any] = {"tool": tool, "tools": tools(tree)}
    if tool is None:
        found["virtio"] = None
        return found
    state = _STATES[tool](tree)
    missing = (
        []
        if state["covered_by"]
        else [m for m in VIRTIO_MODULES if m not in state["named"]]
    )
    virtio = {
        "configured": [m for m in VIRTIO_MODULES if m in state["named"]],
        "missing": missing,
        "covered_by": state["covered_by"],
        "config_files": state["config_files"],
    }
    for key in ("hostonly", "modules_policy", "hooks"):
        if key in state:
            virtio[key] = state[key]
    found["virtio"] = virtio
    return found


def plan(tree: GuestTree, family: str | None) -> FixPlan:
    """Name the missing virtio drivers in the configuration of the guest's tool."""
    result = FixPlan("initramfs_config")
    state = describe(tree, family)
    result.found = state
    tool = state["tool"]
    if tool is None:
        result.applicable = False
        result.notes.append(
            "the guest has none of dracut, update-initramfs or mkinitcpio"
        )
        return result
    missing = state["virtio"]["missing"]
    if not missing:
        covered = state["virtio"]["covered_by"]
        result.notes.append(
            f"the {tool} configuration already includes the virtio drivers"
            + (f" ({covered})" if covered else "")
        )
        return result
    if tool == DRACUT:
        text = (
            "# Written by h2k: the virtio drivers a KVM guest boots from.\n"
            f'add_drivers+=" {" ".join(VIRTIO_MODULES)} "\n'
        )
        before = tree.read_text(H2K_DRACUT_CONF)
        summary = f"dracut drop-in adding {' '.join(VIRTIO_MODULES)}"
        if before is None:
            result.changes.append(changes.create(H2K_DRACUT_CONF, text, summary))
        elif before != text:
            result.changes.append(
                changes.modify(H2K_DRACUT_CONF, before, text, summary)
            )
    elif tool == INITRAMFS_TOOLS:
        before = tree.read_text(INITRAMFS_MODULES)
        addition = "# Added by h2k: virtio drivers for KVM.\n" + "".join(
            f"{m}\n" for m in missing
        )
        summary = f"modules {' '.join(missing)} added"
        if before is None:
            result.changes.append(changes.create(INITRAMFS_MODULES, addition, summary))
        else:
            joiner = "" if not before or before.endswith("\n") else "\n"
            result.changes.append(
                changes.modify(
                    INITRAMFS_MODULES, before, before + joiner + addition, summary
                )
            )
    else:
        change = _mkinitcpio_change(tree, missing)
        if change is None:
            result.notes.append(f"{MKINITCPIO_CONF} has no MODULES line to extend")
        else:
            result.changes.append(change)
    return result


def _mkinitcpio_change(tree: GuestTree, missing: list[str]) -> changes.Change | None:
    before = tree.read_text(MKINITCPIO_CONF)
    if before is None:
        return None
    lines = before.splitlines(keepends=True)
    for index, line in enumerate(lines):
        match = _ARRAY.match(line)
        if match is None or match.group("name") != "MODULES":
            continue
        words = _array_words(match.group("value")) + missing
        ending = "\n" if line.endswith("\n") else ""
        lines[index] = f"MODULES=({' '.join(words)}){ending}"
        summary = f"MODULES gains {' '.join(missing)}"
        return changes.modify(MKINITCPIO_CONF, before, "".join(lines), summary)
    return None
