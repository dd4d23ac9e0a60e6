"""The guest's installed kernels: images in /boot, modules in /lib/modules.

A kernel is usable after the move only with its initramfs and its modules,
and only if virtio's drivers are built in or available as modules; the
kernel's /boot/config-<version> says which (``=y`` built in, ``=m`` module).
"""

from __future__ import annotations

import re
from typing import Any

from h2k.guestos.tree import GuestTree

BOOT = "/boot"
MODULES_DIRS = ("/lib/modules", "/usr/lib/modules")
KERNEL_PREFIXES = ("vmlinuz-", "vmlinux-", "kernel-")
INITRAMFS_PATTERNS = (
    "initramfs-{v}.img",
    "initrd.img-{v}",
    "initrd-{v}",
    "initrd-{v}.img",
)
# Kernel options of the virtio drivers a KVM guest boots with.
VIRTIO_OPTIONS = {
    "virtio_pci": "CONFIG_VIRTIO_PCI",
    "virtio_blk": "CONFIG_VIRTIO_BLK",
    "virtio_scsi": "CONFIG_SCSI_VIRTIO",
    "virtio_net": "CONFIG_VIRTIO_NET",
}
_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(\S+)")


def _config(tree: GuestTree, version: str) -> dict[str, str] | None:
    text = tree.read_text(f"{BOOT}/config-{version}")
    if text is None:
        return None
    values = {}
    for line in text.splitlines():
        match = _CONFIG_LINE.match(line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def module_versions(tree: GuestTree) -> list[str]:
    """Kernel versions with a modules directory (/lib and /usr/lib merged)."""
    seen: dict[str, None] = {}
    for base in MODULES_DIRS:
        for name in tree.listdir(base):
            if tree.is_dir(f"{base}/{name}"):
                seen[name] = None
    return sorted(seen)


def find(tree: GuestTree) -> list[dict[str, Any]]:
    """Each kernel image in /boot with its initramfs, modules and virtio support."""
    modules = set(module_versions(tree))
    found = []
    for name in tree.listdir(BOOT):
        prefix = next((p for p in KERNEL_PREFIXES if name.startswith(p)), None)
        path = f"{BOOT}/{name}"
        if prefix is None or tree.is_symlink(path) or not tree.is_file(path):
            continue
        version = name[len(prefix) :]
        initramfs = next(
            (
                f"{BOOT}/{pattern.format(v=version)}"
                for pattern in INITRAMFS_PATTERNS
                if tree.is_file(f"{BOOT}/{pattern.format(v=version)}")
            ),
            None,
        )
        config = _config(tree, version)
        virtio = None
        if config is not None:
            virtio = {
                driver: {"y": "built-in", "m": "module"}.get(
                    config.get(option, ""), "absent"
                )
                for driver, option in VIRTIO_OPTIONS.items()
            }
        found.append(
            {
                "version": version,
                "image": path,
                "initramfs": initramfs,
                "modules": version in modules,
                "rescue": "rescue" in version,
                "virtio": virtio,
            }
        )
    return found
