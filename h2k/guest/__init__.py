"""Guest-disk access for the operations that look inside a disk.

inspect, offline_fix, fs_repair, lvm_repair and boot_repair all need the
same thing: the guest's partitions, filesystems and logical volumes, and a
mount of one of them, from a VMDK, VHD(X), qcow2, VDI or raw image, on hosts
that may have neither the kernel nbd driver nor device-mapper. This package
gets there in user space::

    image --qemu-nbd (-f FORMAT, Unix socket)--> NBD
          --nbdfuse--> raw file --losetup --offset --sizelimit--> loop --> mount

and reads LVM metadata with the LVM tools told not to use device-mapper,
turning each linear logical volume into a byte range a loop device can
show. Use it as::

    with GuestDisk.open(path, "vmdk", workdir=..., state_dir=...) as disk:
        for fs in disk.filesystems():
            ...
        with disk.mount(fs) as root:
            ...

Everything a session sets up is recorded in a ledger and torn down in
reverse order on the way out; :func:`cleanup_stale` at worker start tears
down what a dead worker left.

Error codes (``OperationError.code``):

``UNSUPPORTED_FORMAT``
    The format is not one h2k opens (raw, qcow2, vmdk, vpc, vhdx, vdi).
``SETUP_FAILED``
    The session's ledger or private directory could not be created (state
    or work directory not writable, disk full).
``IMAGE_OPEN_FAILED``
    The image is missing, or qemu-nbd or nbdfuse could not serve it; the
    details carry the tool's last output.
``IMAGE_LOCKED``
    Another process holds the image's lock (a running VM or conversion);
    retryable.
``NO_PARTITIONS``
    :meth:`GuestDisk.partitions` found no partition table, or an empty one.
``UNSUPPORTED_FILESYSTEM``
    The volume to mount holds no filesystem, or one h2k does not mount
    (swap, an LVM physical volume, LUKS, an unknown type).
``LVM_NOT_LINEAR``
    The logical volume is not linear (striped, mirrored, thin, RAID) or its
    extents do not follow each other, so no single loop device shows it.
``LVM_PV_MISSING``
    The logical volume lies, wholly or partly, on a physical volume that is
    not on this disk.
``READ_ONLY``
    A read-write mount was asked of a read-only session.
``MOUNT_FAILED``
    mount refused the filesystem; the details carry its message.
``TEARDOWN_FAILED``
    The session could not tear everything down; what is left stays in the
    ledger for :func:`cleanup_stale`.

Tools that fail otherwise raise :class:`h2k.errors.ToolError`;
cancellation and time limits raise :class:`h2k.errors.ToolCancelled` and
:class:`h2k.errors.ToolTimeout` as :func:`h2k.tools.process.run_tool` does.
"""

from __future__ import annotations

from h2k.guest.disk import FORMATS, GuestDisk
from h2k.guest.lvm import LogicalVolume, PhysicalVolume
from h2k.guest.partitions import Partition, PartitionTable
from h2k.guest.probe import Filesystem
from h2k.guest.stale import cleanup_stale
from h2k.guest.volume import Volume

__all__ = [
    "FORMATS",
    "Filesystem",
    "GuestDisk",
    "LogicalVolume",
    "Partition",
    "PartitionTable",
    "PhysicalVolume",
    "Volume",
    "cleanup_stale",
]
