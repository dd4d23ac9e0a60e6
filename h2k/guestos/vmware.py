"""VMware tools in a guest: find them, and take them out for KVM.

Under KVM, VMware's guest tools (open-vm-tools, or the older tarball
install) have no host to talk to: their services fail or wait at every
boot, and their udev rule tunes SCSI timeouts for disks that are no longer
there. Removal takes out what the tools install and enable: programs,
configuration and plugin directories, systemd units with their
enablement symlinks and drop-ins, SysV scripts with their rc links, and the
udev rule. Nothing else is touched, and the package database is not edited:
the package manager of the running guest still lists the package, which
the result says, so that it can be removed properly there.
"""

from __future__ import annotations

import re
from typing import Any

from h2k.guestos import changes
from h2k.guestos.changes import Change, FixPlan
from h2k.guestos.tree import GuestTree

_PROGRAMS = (
    "vmtoolsd",
    "vmware-toolbox-cmd",
    "vmware-checkvm",
    "vmware-rpctool",
    "vmware-hgfsclient",
    "vmware-user",
    "vmware-user-suid-wrapper",
    "vmware-vgauth-cmd",
    "vmware-vgauth-smoketest",
    "VGAuthService",
    "vmware-xferlogs",
    "vmware-namespace-cmd",
    "vmhgfs-fuse",
    "vmware-alias-import",
    "vmware-vmblock-fuse",
    "vmware-uninstall-tools.pl",
    "vmware-config-tools.pl",
)
BINARIES = tuple(
    f"{directory}/{name}"
    for directory in ("/usr/bin", "/usr/sbin", "/usr/local/bin")
    for name in _PROGRAMS
) + ("/usr/sbin/mount.vmhgfs", "/sbin/mount.vmhgfs")
CONFIG_DIRS = ("/etc/vmware-tools", "/etc/vmware-caf")
LIBRARY_DIRS = (
    "/usr/lib/vmware-tools",
    "/usr/lib/open-vm-tools",
    "/usr/lib64/open-vm-tools",
    "/usr/lib/x86_64-linux-gnu/open-vm-tools",
    "/usr/lib/aarch64-linux-gnu/open-vm-tools",
    "/usr/lib/vmware-vgauth",
)
UNITS = frozenset(
    {
        "vmtoolsd.service",
        "vgauthd.service",
        "vgauth.service",
        "open-vm-tools.service",
        "vmware-tools.service",
        "vmware-tools-thinprint.service",
        "vmware-vmblock-fuse.service",
        "run-vmblock\\x2dfuse.mount",
    }
)
UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system", "/etc/systemd/system")
ENABLEMENT_DIR = "/etc/systemd/system"
SYSV_SCRIPTS = (
    "/etc/init.d/vmware-tools",
    "/etc/init.d/open-vm-tools",
    "/etc/rc.d/init.d/vmware-tools",
)
RC_DIRS = tuple(f"/etc/rc{level}.d" for level in "0123456S") + tuple(
    f"/etc/rc.d/rc{level}.d" for level in "0123456"
)
UDEV_RULES = tuple(
    f"{directory}/99-vmware-scsi-udev.rules"
    for directory in ("/usr/lib/udev/rules.d", "/lib/udev/rules.d", "/etc/udev/rules.d")
)
PACKAGE_RECORDS = (
    "/var/lib/dpkg/info/open-vm-tools.list",
    "/usr/share/doc/open-vm-tools",
    "/usr/share/licenses/open-vm-tools",
    "/etc/vmware-tools/locations",
)
_RC_LINK = re.compile(r"^[SK]\d\d(vmware-tools|open-vm-tools)$")
_UNIT_DIR_SUFFIXES = (".wants", ".requires", ".upholds", ".d")


def _unit_of_directory(name: str) -> str | None:
    for suffix in _UNIT_DIR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _enablement(tree: GuestTree) -> tuple[list[str], list[str]]:
    """VMware symlinks in /etc/systemd/system and its unit directories.

    Returns (symlinks, directories): links named after a VMware unit or
    pointing at one, and ``<vmware unit>.wants/.requires/.d`` directories.
    """
    links = []
    directories = []
    for name in tree.listdir(ENABLEMENT_DIR):
        path = f"{ENABLEMENT_DIR}/{name}"
        if tree.is_symlink(path):
            if _is_vmware_link(tree, path):
                links.append(path)
            continue
        if not tree.is_dir(path):
            continue
        if _unit_of_directory(name) in UNITS:
            directories.append(path)
            continue
        for entry in tree.listdir(path):
            inner = f"{path}/{entry}"
            if tree.is_symlink(inner) and _is_vmware_link(tree, inner):
                links.append(inner)
    return links, directories


def _is_vmware_link(tree: GuestTree, path: str) -> bool:
    target = tree.readlink(path) or ""
    return path.rsplit("/", 1)[1] in UNITS or target.rsplit("/", 1)[-1] in UNITS


def _existing(tree: GuestTree, paths: list[str] | tuple[str, ...]) -> list[str]:
    """The paths that exist, each once by its canonical name."""
    seen: dict[str, None] = {}
    for path in paths:
        if tree.lexists(path):
            seen.setdefault(tree.canonical(path, follow=False), None)
    return list(seen)


def _unit_files(tree: GuestTree) -> list[str]:
    paths = [f"{d}/{unit}" for d in UNIT_DIRS for unit in sorted(UNITS)]
    return [p for p in _existing(tree, paths) if not tree.is_symlink(p)]


def _rc_links(tree: GuestTree) -> list[str]:
    found = []
    for directory in RC_DIRS:
        for name in tree.listdir(directory):
            if _RC_LINK.match(name):
                found.append(f"{directory}/{name}")
    return _existing(tree, found)


def find(tree: GuestTree) -> dict[str, list[str]]:
    """The evidence of VMware tools, by kind."""
    links, unit_dirs = _enablement(tree)
    return {
        "binaries": _existing(tree, BINARIES),
        "config": _existing(tree, CONFIG_DIRS),
        "libraries": _existing(tree, LIBRARY_DIRS),
        "units": _unit_files(tree),
        "enablement": _existing(tree, links + unit_dirs),
        "sysv": _existing(tree, SYSV_SCRIPTS) + _rc_links(tree),
        "udev_rules": _existing(tree, UDEV_RULES),
        "package_records": _existing(tree, PACKAGE_RECORDS),
    }


def describe(tree: GuestTree) -> dict[str, Any]:
    evidence = find(tree)
    present = any(
        evidence[k] for k in ("binaries", "units", "config", "enablement", "sysv")
    )
    return {"present": present, "evidence": evidence}


def plan(tree: GuestTree) -> FixPlan:
    """Remove the tools: links first, then units, programs and directories."""
    result = FixPlan("vmware_tools")
    evidence = find(tree)
    result.found["evidence"] = evidence
    order = (
        ("enablement", "removed: enables a VMware tools service"),
        ("sysv", "removed: starts VMware tools at boot (SysV)"),
        ("units", "removed: VMware tools systemd unit"),
        ("binaries", "removed: VMware tools program"),
        ("udev_rules", "removed: VMware SCSI udev rule"),
        ("config", "removed: VMware tools configuration"),
        ("libraries", "removed: VMware tools plugins and libraries"),
    )
    planned: list[Change] = []
    seen: set[str] = set()
    for kind, summary in order:
        for path in evidence[kind]:
            if path in seen:
                continue
            seen.add(path)
            planned.append(changes.remove_file(tree, path, summary))
    result.changes = planned
    if not planned:
        result.notes.append("no VMware tools were found")
    records = [p for p in evidence["package_records"] if not p.startswith("/etc/")]
    if planned and records:
        result.notes.append(
            "the package database still lists open-vm-tools "
            f"({', '.join(records)}); remove the package in the running guest"
        )
    return result
