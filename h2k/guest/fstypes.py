"""Which guest filesystems h2k mounts, and with which options.

A read-only mount must not write a byte: ext3/ext4 would replay their
journal and XFS its log even on a read-only mount unless told not to
(``noload``, ``norecovery``), and btrfs would replay its log tree unless
``rescue=nologreplay``. Guest filesystems never get device nodes or setuid
programs on the host (``nodev,nosuid``).
"""

from __future__ import annotations

from dataclasses import dataclass

SAFETY_OPTIONS = ("nodev", "nosuid")


@dataclass(frozen=True)
class MountRule:
    kernel_type: str
    read_only: tuple[str, ...]
    writable: tuple[str, ...] = ("rw",)


# blkid's TYPE -> how to mount it.
RULES: dict[str, MountRule] = {
    "ext2": MountRule("ext2", ("ro",)),
    "ext3": MountRule("ext3", ("ro", "noload")),
    "ext4": MountRule("ext4", ("ro", "noload")),
    "xfs": MountRule("xfs", ("ro", "norecovery")),
    "btrfs": MountRule("btrfs", ("ro", "rescue=nologreplay")),
    "vfat": MountRule("vfat", ("ro",)),
    "exfat": MountRule("exfat", ("ro",)),
    "ntfs": MountRule("ntfs3", ("ro",)),
}


def mount_options(fstype: str, writable: bool) -> tuple[str, list[str]] | None:
    """The kernel type and options for ``fstype``, None when h2k refuses it."""
    rule = RULES.get(fstype)
    if rule is None:
        return None
    options = rule.writable if writable else rule.read_only
    return rule.kernel_type, [*options, *SAFETY_OPTIONS]
