"""Capabilities, what each operation needs, and which queue a job goes to.

Capabilities are ordered by rising privilege. A job goes to the queue named
after the most privileged capability it needs; a worker consumes a queue only
when it holds that capability and every one below it, so any job a worker
receives is one it can run.
"""

from __future__ import annotations

from collections.abc import Iterable

QEMU_IMG = "qemu_img"
NBD_ACCESS = "nbd_access"
MOUNT_OPERATIONS = "mount_operations"
LVM_TOOLS = "lvm_tools"

# Rising order of privilege; the queue names are the capability names.
ORDER: tuple[str, ...] = (QEMU_IMG, NBD_ACCESS, MOUNT_OPERATIONS, LVM_TOOLS)
QUEUES: tuple[str, ...] = ORDER

OPERATIONS: tuple[str, ...] = (
    "convert",
    "inspect",
    "offline_fix",
    "boot_repair",
    "selinux_prep",
    "lvm_repair",
    "fs_repair",
    "initramfs_regenerate",
)

# The most privileged capability each operation needs; it needs every one
# below it as well.
OPERATION_CAPABILITY: dict[str, str] = {
    "convert": QEMU_IMG,
    "inspect": MOUNT_OPERATIONS,
    "offline_fix": MOUNT_OPERATIONS,
    "boot_repair": MOUNT_OPERATIONS,
    "selinux_prep": MOUNT_OPERATIONS,
    "fs_repair": MOUNT_OPERATIONS,
    "initramfs_regenerate": MOUNT_OPERATIONS,
    "lvm_repair": LVM_TOOLS,
}


def rank(capability: str) -> int:
    return ORDER.index(capability)


def with_lower(capability: str) -> list[str]:
    """The capability and every one below it."""
    return list(ORDER[: rank(capability) + 1])


def required_capabilities(operation: str, extra: Iterable[str] = ()) -> list[str]:
    """Everything a job of ``operation`` needs, in rising order."""
    needed = set(with_lower(OPERATION_CAPABILITY[operation]))
    for capability in extra:
        needed.update(with_lower(capability))
    return [c for c in ORDER if c in needed]


def queue_for(operation: str, extra: Iterable[str] = ()) -> str:
    """The queue of the most privileged capability the job needs."""
    return required_capabilities(operation, extra)[-1]


def queues_for_worker(held: Iterable[str]) -> list[str]:
    """The queues a worker holding ``held`` may consume."""
    held = set(held)
    return [q for q in QUEUES if all(c in held for c in with_lower(q))]


def can_run(held: Iterable[str], operation: str, extra: Iterable[str] = ()) -> bool:
    return set(required_capabilities(operation, extra)) <= set(held)
