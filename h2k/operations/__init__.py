"""The operations a worker can run, by name, loaded when first asked for."""

from __future__ import annotations

import importlib

from h2k.operations.base import Operation, OperationContext

_MODULES: dict[str, str] = {
    "convert": "h2k.operations.convert",
    "inspect": "h2k.operations.inspect",
    "offline_fix": "h2k.operations.offline_fix",
    "boot_repair": "h2k.operations.boot_repair",
    "selinux_prep": "h2k.operations.selinux_prep",
    "fs_repair": "h2k.operations.fs_repair",
    "initramfs_regenerate": "h2k.operations.initramfs_regenerate",
    "lvm_repair": "h2k.operations.lvm_repair",
}


def available() -> tuple[str, ...]:
    return tuple(_MODULES)


def get(name: str) -> Operation:
    """The ``run`` function of operation ``name``; KeyError if unknown."""
    module = importlib.import_module(_MODULES[name])
    run: Operation = module.run
    return run


__all__ = ["Operation", "OperationContext", "available", "get"]
