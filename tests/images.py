"""Build real disk images with qemu-img for tests.

Images hold deterministic data of three kinds, one MiB at a time: random
bytes (nothing to compress or skip), a repeated text (compresses well, so
qcow2 compression really happens) and zeros (qemu-img leaves them
unallocated). A conversion that loses or shifts any of it shows up in
``qemu-img compare``.

Test helpers: plain ``subprocess`` is fine here, the code under test uses
:func:`h2k.tools.process.run_tool`.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
from pathlib import Path

MIB = 1024 * 1024

# Wire format -> qemu driver, written out here so the tests do not trust the
# mapping they test.
DRIVERS: dict[str, str] = {
    "vmdk": "vmdk",
    "vhd": "vpc",
    "vhdx": "vhdx",
    "vdi": "vdi",
    "qcow2": "qcow2",
    "raw": "raw",
}
# A raw source is named .img so that its default raw output (.raw) differs.
SUFFIXES: dict[str, str] = {
    "vmdk": ".vmdk",
    "vhd": ".vhd",
    "vhdx": ".vhdx",
    "vdi": ".vdi",
    "qcow2": ".qcow2",
    "raw": ".img",
}


def _mib_of_data(rng: random.Random, index: int) -> bytes:
    kind = index % 4
    if kind == 2:
        return bytes(MIB)
    if kind == 1:
        line = f"h2k test data {rng.getrandbits(64):016x}\n".encode()
        return (line * (MIB // len(line) + 1))[:MIB]
    return rng.randbytes(MIB)


def make_raw(path: str | os.PathLike[str], size_mib: int, pattern_seed: int = 0) -> str:
    """Write a raw disk of ``size_mib`` MiB of deterministic data; return its path."""
    rng = random.Random(pattern_seed)
    with open(path, "wb") as out:
        for index in range(size_mib):
            out.write(_mib_of_data(rng, index))
    return os.fspath(path)


def make_image(
    tmp_dir: str | os.PathLike[str],
    fmt: str,
    size_mib: int = 8,
    *,
    name: str = "disk",
    seed: int = 0,
) -> str:
    """A real ``fmt`` image (wire name) named ``name`` in ``tmp_dir``."""
    target = Path(tmp_dir) / f"{name}{SUFFIXES[fmt]}"
    if fmt == "raw":
        return make_raw(target, size_mib, seed)
    source = Path(tmp_dir) / f".{name}.source.raw"
    make_raw(source, size_mib, seed)
    try:
        qemu_img("convert", "-f", "raw", "-O", DRIVERS[fmt], str(source), str(target))
    finally:
        source.unlink()
    return str(target)


def make_overlay(path: str | os.PathLike[str], backing: str, backing_fmt: str) -> str:
    """A qcow2 image over ``backing``, with a little data of its own."""
    size = info(backing, backing_fmt)["virtual-size"]
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        DRIVERS[backing_fmt],
        str(path),
        str(size),
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 64k 64k", str(path)],
        check=True,
        capture_output=True,
    )
    return os.fspath(path)


def write_vmdk_descriptor(
    path: str | os.PathLike[str], extent: str, size_bytes: int
) -> str:
    """A monolithicFlat VMDK descriptor whose one extent is ``extent``.

    Laid out as VMware writes it, comment lines included: qemu-img 7.2 reads
    an extent line that follows a blank line twice, doubling the disk.
    """
    sectors = size_bytes // 512
    Path(path).write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=fffffffe\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n'
        "# Extent description\n"
        f'RW {sectors} FLAT "{extent}" 0\n\n'
        "# The Disk Data Base\n"
        "#DDB\n\n"
        'ddb.adapterType = "ide"\n'
        'ddb.geometry.cylinders = "16"\n'
        'ddb.geometry.heads = "16"\n'
        'ddb.geometry.sectors = "63"\n'
    )
    return os.fspath(path)


def set_header_refcount(path: str | os.PathLike[str], value: int) -> None:
    """Set the refcount of a qcow2 image's header cluster.

    2 makes qemu-img check report a leaked cluster, 0 a corruption; the data
    still reads back, so only check can tell.
    """
    with open(path, "r+b") as image:
        image.seek(48)
        (table,) = struct.unpack(">Q", image.read(8))
        image.seek(96)
        (order,) = struct.unpack(">I", image.read(4))
        if order != 4:
            raise ValueError(f"expected 16-bit refcounts, found order {order}")
        image.seek(table)
        (block,) = struct.unpack(">Q", image.read(8))
        image.seek(block)
        image.write(struct.pack(">H", value))


def misalign_first_l2(path: str | os.PathLike[str]) -> None:
    """Point a qcow2 image's first L2 table at an unaligned offset.

    The header still opens (``qemu-img info`` succeeds) but reading guest
    data fails, as it would on a disk damaged in transit.
    """
    with open(path, "r+b") as image:
        image.seek(40)
        (l1_offset,) = struct.unpack(">Q", image.read(8))
        image.seek(l1_offset)
        (entry,) = struct.unpack(">Q", image.read(8))
        image.seek(l1_offset)
        image.write(struct.pack(">Q", entry | 0x200))


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *args], check=True, capture_output=True, text=True
    )


def info(path: str, fmt: str) -> dict[str, object]:
    """``qemu-img info`` of ``path`` opened as ``fmt``, parsed."""
    result = qemu_img("info", "-f", DRIVERS[fmt], "--output=json", "-U", path)
    data: dict[str, object] = json.loads(result.stdout)
    return data


def compare(a: str, a_fmt: str, b: str, b_fmt: str) -> subprocess.CompletedProcess[str]:
    """``qemu-img compare``, run directly; returncode 0 means identical."""
    return subprocess.run(
        ["qemu-img", "compare", "-f", DRIVERS[a_fmt], "-F", DRIVERS[b_fmt], a, b],
        capture_output=True,
        text=True,
    )
