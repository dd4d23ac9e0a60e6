"""The guest's boot loader configuration: find it, describe it, repair it.

GRUB 2 keeps its generated menu in grub.cfg (/boot/grub2 on the RHEL side,
/boot/grub on the Debian side, a stub under /boot/efi/EFI/<vendor> on UEFI),
its saved variables in the 1024-byte grubenv block (RHEL 8 keeps the kernel
command line there as ``kernelopts``), its menu entries in BLS snippets
under /boot/loader/entries, its source settings in /etc/default/grub and a
BIOS disk map in device.map. GRUB legacy has menu.lst/grub.conf;
systemd-boot has loader.conf and the same BLS entries.

The repair (one implementation, for offline_fix's ``bootloader`` fix and
for boot_repair) makes the configuration name the disk's filesystems the
way they are now: kernel arguments through
:class:`h2k.guestos.cmdline.ArgumentFixer`, ``search --fs-uuid`` lines of
grub.cfg naming a UUID that is on no filesystem of the disk pointed at the
filesystem holding /boot, and device.map removed (it maps GRUB's BIOS
drives to the old hypervisor's device names; grub2-install writes a new
one if it needs one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from h2k.guestos import changes, cmdline
from h2k.guestos.changes import FixPlan
from h2k.guestos.devices import DeviceIndex, DiskFs
from h2k.guestos.tree import GuestTree

GRUB2 = "grub2"
GRUB_LEGACY = "grub-legacy"
SYSTEMD_BOOT = "systemd-boot"

GRUB_CFG = ("/boot/grub2/grub.cfg", "/boot/grub/grub.cfg")
LEGACY_CFG = ("/boot/grub/menu.lst", "/boot/grub/grub.conf")
GRUBENV = ("/boot/grub2/grubenv", "/boot/grub/grubenv")
DEVICE_MAP = ("/boot/grub2/device.map", "/boot/grub/device.map")
DEFAULT_GRUB = "/etc/default/grub"
KERNEL_CMDLINE = "/etc/kernel/cmdline"
BLS_DIR = "/boot/loader/entries"
EFI_DIRS = ("/boot/efi/EFI", "/efi/EFI")
LOADER_CONF = ("/boot/loader/loader.conf", "/boot/efi/loader/loader.conf")
SYSTEMD_BOOT_EFI = "/systemd/systemd-bootx64.efi"
GRUBENV_SIZE = 1024

_SEARCH_UUID = re.compile(
    r"^(?P<head>\s*search\b[^\n]*?(?:--fs-uuid|\s-u)\b[^\n]*?\s)"
    r"(?P<uuid>[0-9A-Fa-f][0-9A-Fa-f-]{7,})(?P<tail>[ \t]*)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class ConfigFile:
    """A boot configuration file: its guest path and role."""

    path: str
    role: str  # grub.cfg, grubenv, device.map, default, bls, legacy, kernel-cmdline


def _efi_files(tree: GuestTree, name: str) -> list[str]:
    found = []
    for base in EFI_DIRS:
        for vendor in tree.listdir(base):
            path = f"{base}/{vendor}/{name}"
            if tree.is_file(path):
                found.append(path)
    return found


def config_files(tree: GuestTree) -> list[ConfigFile]:
    """Every boot configuration file present, each once (symlinks resolved)."""
    candidates: list[ConfigFile] = []
    for path in [*GRUB_CFG, *_efi_files(tree, "grub.cfg")]:
        candidates.append(ConfigFile(path, "grub.cfg"))
    for path in [*GRUBENV, *_efi_files(tree, "grubenv")]:
        candidates.append(ConfigFile(path, "grubenv"))
    candidates += [ConfigFile(p, "device.map") for p in DEVICE_MAP]
    candidates += [ConfigFile(p, "legacy") for p in LEGACY_CFG]
    candidates.append(ConfigFile(DEFAULT_GRUB, "default"))
    candidates.append(ConfigFile(KERNEL_CMDLINE, "kernel-cmdline"))
    candidates += [ConfigFile(p, "bls") for p in tree.files(BLS_DIR, ".conf")]
    seen: set[str] = set()
    found = []
    for candidate in candidates:
        if not tree.is_file(candidate.path):
            continue
        canonical = tree.canonical(candidate.path)
        if canonical in seen:
            continue
        seen.add(canonical)
        found.append(ConfigFile(canonical, candidate.role))
    return found


def loaders(tree: GuestTree, files: list[ConfigFile]) -> list[str]:
    """Which boot loaders the configuration belongs to."""
    roles = {f.role for f in files}
    found = []
    if roles & {"grub.cfg", "grubenv", "default"}:
        found.append(GRUB2)
    if "legacy" in roles and "grub.cfg" not in roles:
        found.append(GRUB_LEGACY)
    if any(tree.is_file(p) for p in LOADER_CONF) or _efi_files(
        tree, SYSTEMD_BOOT_EFI.strip("/")
    ):
        found.append(SYSTEMD_BOOT)
    return found


def has_grub(files: list[ConfigFile]) -> bool:
    return any(f.role in ("grub.cfg", "legacy", "default", "grubenv") for f in files)


def parse_bls(text: str) -> dict[str, str]:
    """A BLS snippet's ``key value`` lines (the last of a repeated key wins)."""
    entry = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        entry[key] = value.strip()
    return entry


def describe(
    tree: GuestTree, devices: DeviceIndex, boot: DiskFs | None
) -> dict[str, Any]:
    """What boots the guest: loaders, files, BLS entries, filesystem names used."""
    files = config_files(tree)
    arguments = []
    searches = []
    entries = []
    device_map = None
    for config in files:
        text = tree.read_text(config.path) or ""
        arguments += [a.as_dict() for a in cmdline.find(config.path, text, devices)]
        if config.role == "grub.cfg":
            for match in _SEARCH_UUID.finditer(text):
                uuid = match.group("uuid")
                searches.append(
                    {
                        "file": config.path,
                        "uuid": uuid,
                        "on_disk": devices.by_uuid(uuid) is not None,
                    }
                )
        elif config.role == "bls":
            fields = parse_bls(text)
            entries.append(
                {
                    "path": config.path,
                    "title": fields.get("title"),
                    "version": fields.get("version"),
                    "linux": fields.get("linux"),
                    "initrd": fields.get("initrd"),
                    "options": fields.get("options"),
                }
            )
        elif config.role == "device.map":
            device_map = {
                "path": config.path,
                "lines": [
                    line.strip()
                    for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")
                ],
            }
    return {
        "loaders": loaders(tree, files),
        "config_files": [{"path": f.path, "role": f.role} for f in files],
        "bls_entries": entries,
        "kernel_arguments": arguments,
        "grub_searches": searches,
        "device_map": device_map,
        "boot_filesystem": None if boot is None else boot.describe(),
    }


def _grubenv_text(before: str, rewritten: str) -> str | None:
    """``rewritten`` padded back to the block's size; None if it outgrew it."""
    body = rewritten.rstrip("#")
    size = max(len(before.encode("utf-8", "surrogateescape")), GRUBENV_SIZE)
    length = len(body.encode("utf-8", "surrogateescape"))
    if length > size:
        return None
    return body + "#" * (size - length)


def plan(
    tree: GuestTree, devices: DeviceIndex, root: DiskFs, boot: DiskFs | None
) -> FixPlan:
    """The changes that make the boot configuration match this disk.

    ``boot`` is the filesystem holding /boot (the root when /boot is not
    separate); ``search --fs-uuid`` lines that find nothing point at it.
    """
    result = FixPlan("bootloader")
    files = config_files(tree)
    result.found["loaders"] = loaders(tree, files)
    result.found["config_files"] = [f.path for f in files]
    if not has_grub(files):
        result.applicable = False
        result.notes.append("no GRUB configuration was found in the guest")
        return result
    fixer = cmdline.ArgumentFixer(devices, root)
    boot_fs = boot or root
    for config in files:
        before = tree.read_text(config.path)
        if before is None:
            continue
        if config.role == "device.map":
            result.changes.append(
                changes.remove_file(
                    tree,
                    config.path,
                    "removed: it maps GRUB's drives to the old hypervisor's "
                    "device names",
                )
            )
            continue
        after, replaced = cmdline.rewrite(before, fixer.replacement)
        summary = [f"{r['param']}={r['before']} -> {r['after']}" for r in replaced]
        if config.role == "grub.cfg" and boot_fs.uuid:
            after, searched = _repair_searches(after, devices, boot_fs.uuid)
            summary += [f"search {old} -> {boot_fs.uuid}" for old in searched]
        if config.role == "grubenv" and after != before:
            padded = _grubenv_text(before, after)
            if padded is None:
                result.notes.append(
                    f"{config.path}: the repaired variables do not fit the "
                    f"{GRUBENV_SIZE}-byte block; left as it is"
                )
                continue
            after = padded
        if after != before:
            summary = list(dict.fromkeys(summary))
            result.changes.append(
                changes.modify(config.path, before, after, "; ".join(summary))
            )
    result.notes += list(dict.fromkeys(fixer.notes))
    return result


def _repair_searches(
    text: str, devices: DeviceIndex, uuid: str
) -> tuple[str, list[str]]:
    replaced: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        old = match.group("uuid")
        if devices.by_uuid(old) is not None or old.lower() == uuid.lower():
            return match.group(0)
        replaced.append(old)
        return match.group("head") + uuid + match.group("tail")

    return _SEARCH_UUID.sub(substitute, text), replaced
