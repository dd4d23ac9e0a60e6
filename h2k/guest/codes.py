"""The codes the guest-disk layer puts in :class:`h2k.errors.OperationError`.

They are described in the package docstring of :mod:`h2k.guest`; the
operations that use the layer pass them on unchanged.
"""

from __future__ import annotations

UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
SETUP_FAILED = "SETUP_FAILED"
IMAGE_OPEN_FAILED = "IMAGE_OPEN_FAILED"
IMAGE_LOCKED = "IMAGE_LOCKED"
NO_PARTITIONS = "NO_PARTITIONS"
UNSUPPORTED_FILESYSTEM = "UNSUPPORTED_FILESYSTEM"
LVM_NOT_LINEAR = "LVM_NOT_LINEAR"
LVM_PV_MISSING = "LVM_PV_MISSING"
READ_ONLY = "READ_ONLY"
MOUNT_FAILED = "MOUNT_FAILED"
TEARDOWN_FAILED = "TEARDOWN_FAILED"

ALL: frozenset[str] = frozenset(
    {
        UNSUPPORTED_FORMAT,
        SETUP_FAILED,
        IMAGE_OPEN_FAILED,
        IMAGE_LOCKED,
        NO_PARTITIONS,
        UNSUPPORTED_FILESYSTEM,
        LVM_NOT_LINEAR,
        LVM_PV_MISSING,
        READ_ONLY,
        MOUNT_FAILED,
        TEARDOWN_FAILED,
    }
)
