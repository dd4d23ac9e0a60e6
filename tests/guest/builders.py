"""Real guest disks for the guest-layer tests, built with the standard tools.

Every disk is a sparse raw file laid out with sfdisk, its filesystems made
with mkfs (``mkfs.ext4 -d`` fills one without mounting it), then converted
with qemu-img to the format a hypervisor would hand us. The LVM disk is
made with the LVM tools on a loop device, told not to use device-mapper
(``--driverloaded n``, logical volumes created inactive and unzeroed); its
ext4 is written at the byte offset that follows from LVM's defaults, so the
layer's own offset arithmetic is checked against a number computed here
independently.

The other disk builders (tests/guestdisks.py, tests/repairdisks.py,
tests/initramfsdisks.py) use the tools from here too, and the tests read
their results back with them: :func:`to_raw`, :func:`sfdisk_partitions`,
:func:`loop_device`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MiB = 2**20
LINUX_FS_GUID = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
LINUX_LVM_GUID = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
ROOT_UUID = "6f1d2c3b-4a59-4e6f-8a7b-9c0d1e2f3a4b"
WHOLE_UUID = "0b9e8d7c-6b5a-4f3e-9d2c-1b0a9f8e7d6c"
XFS_UUID = "11111111-2222-3333-4444-555555555555"
LV_ROOT_UUID = "a1b2c3d4-e5f6-4789-8abc-def012345678"
MBR_DISK_ID = "0x1a2b3c4d"
OS_RELEASE = 'PRETTY_NAME="h2k test guest"\nID=debian\nVERSION_ID="12"\n'
FSTAB = f"UUID={ROOT_UUID} / ext4 defaults 0 1\n"
# Lets mkfs.xfs make a filesystem below its 300 MB floor, as in xfstests.
XFS_SMALL_ENV = {"TEST_DIR": "/tmp", "TEST_DEV": "h2k-test", "QA_CHECK_FS": "1"}
LVM_CONFIG_TAIL = (
    "global{notify_dbus=0 use_lvmpolld=0} "
    "activation{udev_sync=0 udev_rules=0 monitoring=0} "
    "backup{backup=0 archive=0}"
)


@dataclass(frozen=True)
class BuiltDisk:
    """A converted guest image and what was put into it."""

    image: str
    fmt: str
    raw: str


def run(*argv: str, env: dict[str, str] | None = None, input: str | None = None) -> str:
    full_env = dict(os.environ, LC_ALL="C", **(env or {}))
    result = subprocess.run(
        list(argv),
        check=True,
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
    )
    return result.stdout


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def sparse_file(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def guest_tree(directory: str) -> str:
    """The files of a minimal Linux root: /etc/os-release and /etc/fstab."""
    root = os.path.join(directory, "tree")
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    with open(os.path.join(root, "etc", "os-release"), "w", encoding="utf-8") as f:
        f.write(OS_RELEASE)
    with open(os.path.join(root, "etc", "fstab"), "w", encoding="utf-8") as f:
        f.write(FSTAB)
    return root


def mkfs_ext4(raw: str, *, offset: int, size: int, label: str, uuid: str, tree: str):
    run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        label,
        "-U",
        uuid,
        "-d",
        tree,
        "-E",
        f"offset={offset}",
        raw,
        f"{size // 1024}k",
    )


def convert(raw: str, image: str, fmt: str) -> None:
    run("qemu-img", "convert", "-f", "raw", "-O", fmt, raw, image)


def gpt_ext4_disk(directory: str) -> BuiltDisk:
    """32 MiB, GPT, partition 1 "root" (1 MiB - 29 MiB): ext4 "root"; VMDK."""
    raw = os.path.join(directory, "gpt.raw")
    sparse_file(raw, 32 * MiB)
    run(
        "sfdisk",
        "-q",
        raw,
        input="label: gpt\n"
        f'start=2048, size=57344, type={LINUX_FS_GUID}, name="root"\n',
    )
    tree = guest_tree(directory)
    mkfs_ext4(raw, offset=MiB, size=28 * MiB, label="root", uuid=ROOT_UUID, tree=tree)
    image = os.path.join(directory, "gpt.vmdk")
    convert(raw, image, "vmdk")
    return BuiltDisk(image, "vmdk", raw)


def mbr_xfs_disk(directory: str) -> BuiltDisk:
    """48 MiB, MBR, partition 1 bootable (1 MiB - 41 MiB): XFS "data"; VHDX."""
    raw = os.path.join(directory, "mbr.raw")
    sparse_file(raw, 48 * MiB)
    run(
        "sfdisk",
        "-q",
        raw,
        input=f"label: dos\nlabel-id: {MBR_DISK_ID}\n"
        "start=2048, size=81920, type=83, bootable\n",
    )
    part = os.path.join(directory, "xfs-part.raw")
    run(
        "mkfs.xfs",
        "-q",
        "-f",
        "-L",
        "data",
        "-m",
        f"uuid={XFS_UUID}",
        "-d",
        f"file,name={part},size={40 * MiB}",
        env=XFS_SMALL_ENV,
    )
    run("dd", f"if={part}", f"of={raw}", "bs=1M", "seek=1", "conv=notrunc,sparse")
    os.unlink(part)
    image = os.path.join(directory, "mbr.vhdx")
    convert(raw, image, "vhdx")
    return BuiltDisk(image, "vhdx", raw)


def whole_disk_ext4(directory: str) -> BuiltDisk:
    """16 MiB ext4 "whole" with no partition table; kept raw."""
    raw = os.path.join(directory, "whole.raw")
    sparse_file(raw, 16 * MiB)
    tree = guest_tree(directory)
    mkfs_ext4(raw, offset=0, size=16 * MiB, label="whole", uuid=WHOLE_UUID, tree=tree)
    return BuiltDisk(raw, "raw", raw)


def attach_loop(raw: str, offset: int, size: int, *, read_only: bool = False) -> str:
    """A new loop device over ``size`` bytes at ``offset`` of ``raw``."""
    mode = ["--read-only"] if read_only else []
    return run(
        "losetup",
        "--find",
        "--show",
        *mode,
        "--offset",
        str(offset),
        "--sizelimit",
        str(size),
        raw,
    ).strip()


@contextmanager
def loop_device(
    raw: str, offset: int, size: int, *, read_only: bool = False
) -> Iterator[str]:
    """A loop device over ``size`` bytes at ``offset`` of ``raw``; detached after."""
    loop = attach_loop(raw, offset, size, read_only=read_only)
    try:
        yield loop
    finally:
        run("losetup", "--detach", loop)


def lvm(loop: str, system_dir: str, *argv: str) -> str:
    """An LVM tool that sees ``loop`` alone, without device-mapper or locks."""
    config = (
        f'devices{{use_devicesfile=0 hints="none" filter=["a|^{loop}$|", "r|.*|"]}} '
        f"{LVM_CONFIG_TAIL}"
    )
    return run(
        argv[0],
        "--driverloaded",
        "n",
        "--nolocking",
        "--config",
        config,
        *argv[1:],
        env={"LVM_SYSTEM_DIR": system_dir, "LVM_SUPPRESS_FD_WARNINGS": "1"},
    )


def pe_start(loop: str, system_dir: str) -> int:
    """Where the PV on ``loop`` puts its first extent, in bytes, as pvs says."""
    report = lvm(
        loop,
        system_dir,
        "pvs",
        "--readonly",
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "pe_start",
    )
    return int(json.loads(report)["report"][0]["pv"][0]["pe_start"])


def lvm_disk(directory: str) -> BuiltDisk:
    """64 MiB, GPT, partition 1 (1 MiB, 62 MiB) an LVM PV of VG "vgguest".

    Extents of 4 MiB from 1 MiB into the PV: ``root`` (12 MiB, extents 0-2,
    ext4 "lvroot"), ``split`` (extent 3 and, after ``pad`` took 4, extent 5:
    linear but not contiguous), ``pad`` (extent 4). qcow2.
    """
    raw = os.path.join(directory, "lvm.raw")
    sparse_file(raw, 64 * MiB)
    run(
        "sfdisk",
        "-q",
        raw,
        input=f"label: gpt\nstart=2048, size=126976, type={LINUX_LVM_GUID}\n",
    )
    system_dir = os.path.join(directory, "lvm-system")
    os.makedirs(system_dir, exist_ok=True)
    with loop_device(raw, MiB, 126976 * 512) as loop:
        lvm(loop, system_dir, "pvcreate", loop)
        lvm(loop, system_dir, "vgcreate", "-s", "4M", "vgguest", loop)
        inactive = ("--activate", "n", "--zero", "n")
        for name, size in (("root", "12M"), ("split", "4M"), ("pad", "4M")):
            lvm(
                loop,
                system_dir,
                "lvcreate",
                *inactive,
                "-L",
                size,
                "-n",
                name,
                "vgguest",
            )
        lvm(loop, system_dir, "lvextend", "-L", "8M", "vgguest/split")
        first = pe_start(loop, system_dir)
    assert first == MiB, f"LVM put the first extent at {first}, not 1 MiB"
    tree = guest_tree(directory)
    mkfs_ext4(
        raw,
        offset=LV_ROOT_OFFSET,
        size=12 * MiB,
        label="lvroot",
        uuid=LV_ROOT_UUID,
        tree=tree,
    )
    image = os.path.join(directory, "lvm.qcow2")
    convert(raw, image, "qcow2")
    return BuiltDisk(image, "qcow2", raw)


# Partition at 1 MiB + first extent at 1 MiB into the PV + extent 0.
LV_ROOT_OFFSET = 2 * MiB
# pad is extent 4: 1 MiB + 1 MiB + 4 * 4 MiB.
LV_PAD_OFFSET = 18 * MiB


# Reading a disk back, independently of h2k.


def to_raw(image: str, fmt: str, directory: str) -> str:
    """``image`` converted to raw with qemu-img (an overlay reads its backing)."""
    raw = os.path.join(directory, os.path.basename(image) + ".check.raw")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw)
    return raw


def sfdisk_partitions(raw: str) -> dict[int, tuple[int, int]]:
    """Partition number -> (start, size) in bytes, from ``sfdisk --json``."""
    table = json.loads(run("sfdisk", "--json", raw))["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    found = {}
    for row in table["partitions"]:
        number = int(re.search(r"(\d+)$", row["node"]).group(1))
        found[number] = (int(row["start"]) * sector, int(row["size"]) * sector)
    return found
