"""Damaged guest disks for the fs_repair and lvm_repair tests.

Each disk is laid out with sfdisk, its filesystems made with mkfs in files
of their own, broken there with the filesystem's own debugger (debugfs,
xfs_db) or a kernel shutdown, and copied in with dd at the partition's (or
logical volume's) byte offset; LVM is built with the LVM tools on a loop
device told not to use device-mapper, and its metadata broken with dd at
offsets pvck reports. Every layout is written out here in sectors, so the
tests can check the operations' offsets against numbers computed
independently. Images stay small and sparse (tens of MiB).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from h2k.operations.base import OperationContext
from tests.guest.builders import (
    LINUX_FS_GUID,
    LINUX_LVM_GUID,
    LVM_CONFIG_TAIL,
    XFS_SMALL_ENV,
    MiB,
    attach_loop,
    convert,
    guest_tree,
    loop_device,
    run,
    sfdisk_partitions,
    sparse_file,
    to_raw,
)
from tests.guest.leaks import assert_clean, isolate_sessions
from tests.recording import Recorder

SECTOR = 512
BROKEN_UUID = "0e5a1b2c-3d4e-4f50-8a61-7b8c9d0e1f20"
LV_BROKEN_UUID = "1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a10"
XFS_CLEAN_UUID = "22222222-3333-4444-5555-666666666666"
XFS_DIRTY_UUID = "33333333-4444-5555-6666-777777777777"
XFS_DAMAGED_UUID = "44444444-5555-6666-7777-888888888888"
SWAP_UUID = "5a5a5a5a-6b6b-4c7c-8d8d-9e9e9e9e9e9e"
FUTURE_UUID = "6c6c6c6c-7d7d-4e8e-9f9f-0a0a0a0a0a0a"
FIXABLE_UUID = "7e7e7e7e-8f8f-4a9a-8b0b-1c1c1c1c1c1c"
LVM_LINES = re.compile(
    r"metadata at (\d+) length (\d+) crc [0-9a-f]+ vg (\S+) seqno (\d+) id (\S+)"
)


@dataclass(frozen=True)
class Part:
    """A partition in sectors; ``start``/``size`` in bytes below."""

    number: int
    first: int
    sectors: int

    @property
    def start(self) -> int:
        return self.first * SECTOR

    @property
    def size(self) -> int:
        return self.sectors * SECTOR


@dataclass
class Disk:
    """A built image, the raw file it came from and what is where in it."""

    image: str
    fmt: str
    raw: str
    parts: dict[str, Part]
    offsets: dict[str, int] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)


def layout(raw: str, size: int, parts: list[tuple[str, int, int, str]]) -> dict:
    """A GPT on a sparse ``raw`` of ``size`` bytes: (name, first, sectors, type)."""
    sparse_file(raw, size)
    lines = ["label: gpt"]
    for name, first, sectors, kind in parts:
        lines.append(f'start={first}, size={sectors}, type={kind}, name="{name}"')
    run("sfdisk", "-q", raw, input="\n".join(lines) + "\n")
    return {
        name: Part(number, first, sectors)
        for number, (name, first, sectors, _) in enumerate(parts, start=1)
    }


def place(piece: str, raw: str, offset: int) -> None:
    """Copy the file ``piece`` into ``raw`` at byte ``offset``, keeping holes."""
    run(
        "dd",
        f"if={piece}",
        f"of={raw}",
        "bs=64K",
        f"seek={offset}",
        "oflag=seek_bytes",
        "conv=notrunc,sparse",
    )
    os.unlink(piece)


def write_at(raw: str, offset: int, data: bytes) -> None:
    with open(raw, "r+b") as f:
        f.seek(offset)
        f.write(data)


# Filesystems, made in files of their own.


def ext4_file(path: str, size: int, label: str, uuid: str, tree: str) -> None:
    sparse_file(path, size)
    run("mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid, "-d", tree, path)


def break_ext4(path: str) -> None:
    """Errors e2fsck -y fixes (exit 1): a used block marked free, a bad link count.

    debugfs keeps the checksums right, so e2fsck sees exactly these two.
    """
    stat = run("debugfs", "-R", "stat /etc/os-release", path)
    block = int(re.search(r"\(0\):(\d+)", stat).group(1))  # type: ignore[union-attr]
    run("debugfs", "-w", "-R", f"freeb {block}", path)
    run("debugfs", "-w", "-R", "sif /etc/fstab links_count 3", path)


def future_ext4(path: str) -> None:
    """An incompatible feature this e2fsck does not know: it cannot check it (8)."""
    run("debugfs", "-w", "-R", "feature FEATURE_I31", path)


def xfs_file(path: str, size: int, label: str, uuid: str) -> None:
    """XFS of two allocation groups (xfs_repair refuses to check a single one)."""
    run(
        "mkfs.xfs",
        "-q",
        "-f",
        "-L",
        label,
        "-m",
        f"uuid={uuid}",
        "-d",
        f"file,name={path},size={size},agcount=2",
        env=XFS_SMALL_ENV,
    )


def break_xfs(path: str) -> None:
    """The root directory's link count made wrong; xfs_repair resets it."""
    rootino = run("xfs_db", "-c", "sb 0", "-c", "p rootino", path).split("=")[1]
    run(
        "xfs_db",
        "-x",
        "-c",
        f"inode {rootino.strip()}",
        "-c",
        "write core.nlinkv2 7",
        path,
    )


def dirty_xfs_log(path: str, mountpoint: str) -> None:
    """Mount, write, shut the filesystem down: its log keeps the changes."""
    os.makedirs(mountpoint, exist_ok=True)
    run("mount", "-o", "loop", path, mountpoint)
    try:
        with open(os.path.join(mountpoint, "note.txt"), "w", encoding="utf-8") as f:
            f.write("written before the crash\n")
        run("xfs_io", "-x", "-c", "shutdown -f", mountpoint)
    finally:
        run("umount", mountpoint)


# LVM, without device-mapper.


class Lvm:
    """The LVM tools on loop devices over byte ranges of one raw file."""

    def __init__(self, raw: str, system_dir: str):
        self.raw = raw
        self.system_dir = system_dir
        self.loops: list[str] = []
        os.makedirs(system_dir, exist_ok=True)

    def attach(self, offset: int, size: int) -> str:
        loop = attach_loop(self.raw, offset, size)
        self.loops.append(loop)
        return loop

    def __call__(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        accepted = ", ".join(f'"a|^{loop}$|"' for loop in self.loops)
        config = (
            f'devices{{use_devicesfile=0 hints="none" filter=[{accepted}, "r|.*|"] '
            f'global_filter=[{accepted}, "r|.*|"]}} {LVM_CONFIG_TAIL}'
        )
        env = dict(
            os.environ,
            LC_ALL="C",
            LVM_SYSTEM_DIR=self.system_dir,
            LVM_SUPPRESS_FD_WARNINGS="1",
        )
        return subprocess.run(
            [argv[0], "--driverloaded", "n", "--nolocking", "--config", config]
            + list(argv[1:]),
            capture_output=True,
            text=True,
            env=env,
            check=check,
        )

    def copies(self, loop: str, mda: int = 1) -> list[tuple[int, int, str, int]]:
        """(offset, length, vg, seqno) of every metadata copy pvck finds."""
        out = self(
            "pvck", "--dump", "metadata_search", "--settings", f"mda_num={mda}", loop
        )
        return [
            (int(m[1]), int(m[2]), m[3], int(m[4]))
            for m in LVM_LINES.finditer(out.stdout)
        ]

    def close(self) -> None:
        for loop in reversed(self.loops):
            subprocess.run(["losetup", "--detach", loop], check=False)
        self.loops.clear()


@contextmanager
def lvm_on(raw: str, directory: str) -> Iterator[Lvm]:
    tools = Lvm(raw, os.path.join(directory, "lvm-system"))
    try:
        yield tools
    finally:
        tools.close()


def _inactive_lv(lvm: Lvm, vg: str, name: str, size: str) -> None:
    lvm("lvcreate", "--activate", "n", "--zero", "n", "-L", size, "-n", name, vg)


# The disks.


def fs_disk(directory: str) -> Disk:
    """64 MiB GPT, VMDK: every case fs_repair meets on one disk.

    1: ext4 "broken" (12 MiB) with a free-marked used block and a bad link
    count; 2: XFS "data" (32 MiB), clean; 3: swap (2 MiB); 4: LVM PV of VG
    "vgfs" (1 MiB extents from 1 MiB): ``root`` (8 MiB, ext4 "lvbroken",
    broken like 1), ``split`` (linear but not contiguous) and ``pad``.
    """
    raw = os.path.join(directory, "fs.raw")
    parts = layout(
        raw,
        64 * MiB,
        [
            ("broken", 2048, 24576, LINUX_FS_GUID),
            ("data", 26624, 65536, LINUX_FS_GUID),
            ("swap", 92160, 4096, "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"),
            ("lvm", 96256, 28672, LINUX_LVM_GUID),
        ],
    )
    tree = guest_tree(directory)
    piece = os.path.join(directory, "piece")
    ext4_file(piece, 12 * MiB, "broken", BROKEN_UUID, tree)
    break_ext4(piece)
    place(piece, raw, parts["broken"].start)
    xfs_file(piece, 32 * MiB, "data", XFS_CLEAN_UUID)
    place(piece, raw, parts["data"].start)
    sparse_file(piece, parts["swap"].size)
    run("mkswap", "-L", "swap", "-U", SWAP_UUID, piece)
    place(piece, raw, parts["swap"].start)
    pv = parts["lvm"]
    with lvm_on(raw, directory) as lvm:
        loop = lvm.attach(pv.start, pv.size)
        lvm("pvcreate", loop)
        lvm("vgcreate", "-s", "1M", "vgfs", loop)
        _inactive_lv(lvm, "vgfs", "root", "8M")
        _inactive_lv(lvm, "vgfs", "split", "1M")
        _inactive_lv(lvm, "vgfs", "pad", "1M")
        lvm("lvextend", "-L", "2M", "vgfs/split")
    lv_offset = pv.start + MiB
    ext4_file(piece, 8 * MiB, "lvbroken", LV_BROKEN_UUID, tree)
    break_ext4(piece)
    place(piece, raw, lv_offset)
    image = os.path.join(directory, "fs.vmdk")
    convert(raw, image, "vmdk")
    return Disk(image, "vmdk", raw, parts, {"lvm vgfs/root": lv_offset})


def xfs_disk(directory: str) -> Disk:
    """68 MiB GPT, qcow2: XFS "dirty" (a log left to replay), XFS "damaged"."""
    raw = os.path.join(directory, "xfs.raw")
    parts = layout(
        raw,
        68 * MiB,
        [
            ("dirty", 2048, 65536, LINUX_FS_GUID),
            ("damaged", 67584, 65536, LINUX_FS_GUID),
        ],
    )
    piece = os.path.join(directory, "piece")
    xfs_file(piece, 32 * MiB, "dirty", XFS_DIRTY_UUID)
    dirty_xfs_log(piece, os.path.join(directory, "mnt"))
    place(piece, raw, parts["dirty"].start)
    xfs_file(piece, 32 * MiB, "damaged", XFS_DAMAGED_UUID)
    break_xfs(piece)
    place(piece, raw, parts["damaged"].start)
    image = os.path.join(directory, "xfs.qcow2")
    convert(raw, image, "qcow2")
    return Disk(image, "qcow2", raw, parts)


def unrepairable_disk(directory: str) -> Disk:
    """20 MiB GPT, VHDX: ext4 "future" e2fsck cannot check, ext4 "fixable" broken."""
    raw = os.path.join(directory, "unrepairable.raw")
    parts = layout(
        raw,
        20 * MiB,
        [
            ("future", 2048, 16384, LINUX_FS_GUID),
            ("fixable", 18432, 16384, LINUX_FS_GUID),
        ],
    )
    tree = guest_tree(directory)
    piece = os.path.join(directory, "piece")
    ext4_file(piece, 8 * MiB, "future", FUTURE_UUID, tree)
    future_ext4(piece)
    place(piece, raw, parts["future"].start)
    ext4_file(piece, 8 * MiB, "fixable", FIXABLE_UUID, tree)
    break_ext4(piece)
    place(piece, raw, parts["fixable"].start)
    image = os.path.join(directory, "unrepairable.vhdx")
    convert(raw, image, "vhdx")
    return Disk(image, "vhdx", raw, parts)


# LVM metadata damage. Every disk: GPT, PVs of 14 MiB from 1 MiB, VG
# "vgrep" (1 MiB extents): "root" (4 MiB) then "data" (2 MiB), so the
# metadata's seqno is 3 and the ring buffer still holds seqnos 1 and 2.

LVM_DAMAGE = (
    "clean",
    "header",
    "newest",
    "wiped",
    "two_pvs",
    "mda2",
    "reused",
    "reused_header",
)
PV_SECTORS = 28672


def lvm_disk(directory: str, damage: str) -> Disk:
    """A VMDK whose LVM metadata is broken as ``damage`` says.

    - ``clean``: nothing broken.
    - ``header``: the first metadata area's header sector zeroed; the text
      behind it is whole.
    - ``newest``: the newest copy (seqno 3) overwritten with garbage; 1 and
      2 remain in the ring buffer.
    - ``wiped``: the whole first metadata area zeroed: no copy anywhere.
    - ``two_pvs``: two PVs; the first one's metadata area zeroed, the
      second one's intact.
    - ``mda2``: a PV with a second metadata area at its end; the first one
      zeroed.
    - ``reused``: the PV first held VG "vgold" (LVs a, b, c), removed a
      second before "vgrep" was made on it: the ring buffer still holds
      copies of vgold. Nothing broken.
    - ``reused_header``: ``reused`` with the header sector zeroed, so only
      the copies' write times tell vgrep is the current group.
    """
    if damage not in LVM_DAMAGE:
        raise ValueError(damage)
    raw = os.path.join(directory, f"lvm-{damage}.raw")
    entries = [("pv1", 2048, PV_SECTORS, LINUX_LVM_GUID)]
    if damage == "two_pvs":
        entries.append(("pv2", 2048 + PV_SECTORS, PV_SECTORS, LINUX_LVM_GUID))
    parts = layout(raw, 32 * MiB, entries)
    notes: dict[str, object] = {}
    with lvm_on(raw, directory) as lvm:
        loops = [lvm.attach(p.start, p.size) for p in parts.values()]
        copies = ["--pvmetadatacopies", "2"] if damage == "mda2" else []
        for loop in loops:
            lvm("pvcreate", *copies, loop)
        if damage.startswith("reused"):
            lvm("vgcreate", "-s", "1M", "vgold", *loops)
            for name in ("a", "b", "c"):
                _inactive_lv(lvm, "vgold", name, "1M")
            lvm("vgremove", "--force", "vgold")
            # LVM stamps each copy with the second it was written.
            time.sleep(1.1)
        lvm("vgcreate", "-s", "1M", "vgrep", *loops)
        _inactive_lv(lvm, "vgrep", "root", "4M")
        _inactive_lv(lvm, "vgrep", "data", "2M")
        found = lvm.copies(loops[0])
        notes["copies"] = found
        uuid_report = lvm("pvs", "--readonly", "--noheadings", "-o", "pv_uuid")
        notes["pv_uuids"] = sorted(uuid_report.stdout.split())
    pv1 = parts["pv1"].start
    if damage in ("header", "reused_header"):
        write_at(raw, pv1 + 4096, bytes(SECTOR))
    elif damage == "newest":
        offset, length, _, seqno = max(found, key=lambda c: c[3])
        assert seqno == 3, found
        write_at(raw, pv1 + offset + 64, b"}{ garbage ]=[ " * 8)
    elif damage in ("wiped", "two_pvs", "mda2"):
        write_at(raw, pv1 + 4096, bytes(MiB - 4096))
    image = os.path.join(directory, f"lvm-{damage}.vmdk")
    convert(raw, image, "vmdk")
    return Disk(image, "vmdk", raw, parts, notes=notes)


def copy_disk(disk: Disk, directory: str) -> Disk:
    """The same disk in another directory, for a test that changes it."""
    os.makedirs(directory, exist_ok=True)
    image = os.path.join(directory, os.path.basename(disk.image))
    shutil.copyfile(disk.image, image)
    return Disk(image, disk.fmt, disk.raw, disk.parts, disk.offsets, disk.notes)


# Running an operation, and checking what it left, without h2k's help.


@dataclass
class Workspace:
    """An allowed root for images and outputs, and the guest layer's own dirs."""

    base: Path
    root: Path
    work: Path
    state: Path

    def add(self, disk: Disk) -> Disk:
        """A copy of ``disk`` inside the root, for one test to change."""
        return copy_disk(disk, str(self.root))

    def run(
        self,
        run: Callable[[OperationContext], dict[str, Any]],
        operation: str,
        disk: Disk,
        *,
        recorder: Recorder | None = None,
        should_stop: Callable[[], bool] | None = None,
        **parameters: Any,
    ) -> dict[str, Any]:
        spec = {
            "job_id": "job-1",
            "operation": operation,
            "image": {"path": disk.image, "format": disk.fmt},
            "parameters": parameters,
            "execution_policy": {"timeout_seconds": 600},
        }
        ctx = OperationContext(
            job_id="job-1",
            spec=spec,
            report=recorder or Recorder(),
            should_stop=should_stop or (lambda: False),
            allowed_roots=(str(self.root),),
        )
        return run(ctx)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.root))

    def check_clean(self) -> None:
        """No mount, loop device, FUSE mount, process or session file is left."""
        assert_clean(str(self.base), str(self.work), str(self.state))
        assert not [name for name in self.files() if name.endswith(".part")]


@contextmanager
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """Sessions go below ``tmp_path``, so whatever they leave can be found."""
    space = Workspace(
        tmp_path, tmp_path / "root", tmp_path / "work", tmp_path / "state"
    )
    for path in (space.root, space.work, space.state):
        path.mkdir()
    isolate_sessions(monkeypatch, str(space.work), str(space.state))
    yield space
    space.check_clean()


# The names the end-to-end tests read results back with.
raw_copy = to_raw
partitions = sfdisk_partitions


def check_range(tool: list[str], raw: str, offset: int, size: int) -> int:
    """``tool`` on a read-only loop over ``size`` bytes at ``offset``; its status."""
    with loop_device(raw, offset, size, read_only=True) as loop:
        done = subprocess.run(
            [*tool, loop],
            capture_output=True,
            text=True,
            env=dict(os.environ, LC_ALL="C"),
        )
    return done.returncode


def e2fsck_status(raw: str, offset: int, size: int) -> int:
    return check_range(["e2fsck", "-f", "-n"], raw, offset, size)


def xfs_status(raw: str, offset: int, size: int) -> int:
    return check_range(["xfs_repair", "-n"], raw, offset, size)
