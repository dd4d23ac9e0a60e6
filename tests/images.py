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
    options: str | None = None,
) -> str:
    """A real ``fmt`` image (wire name) named ``name`` in ``tmp_dir``.

    ``options`` go to ``qemu-img convert -o`` (``subformat=streamOptimized``).
    """
    target = Path(tmp_dir) / f"{name}{SUFFIXES[fmt]}"
    if fmt == "raw":
        return make_raw(target, size_mib, seed)
    source = Path(tmp_dir) / f".{name}.source.raw"
    make_raw(source, size_mib, seed)
    extra = ["-o", options] if options else []
    try:
        qemu_img(
            "convert", "-f", "raw", "-O", DRIVERS[fmt], *extra, str(source), str(target)
        )
    finally:
        source.unlink()
    return str(target)


def make_raw_bytes(
    path: str | os.PathLike[str], size_bytes: int, pattern_seed: int = 0
) -> str:
    """A raw disk of exactly ``size_bytes`` whose last 64 KiB are not zeros.

    A reader that cuts the disk short therefore loses data, which
    ``qemu-img compare`` sees.
    """
    make_raw(path, -(-size_bytes // MIB), pattern_seed)
    os.truncate(path, size_bytes)
    with open(path, "r+b") as disk:
        disk.seek(size_bytes - 64 * 1024)
        disk.write(b"\xa5" * 64 * 1024)
    return os.fspath(path)


def vhd_geometry(size_bytes: int) -> tuple[int, int, int]:
    """(cylinders, heads, sectors per track) the VHD specification gives a size.

    The specification's algorithm rounds down, so the geometry can describe
    a few sectors less than the disk holds.
    """
    sectors = min(size_bytes // 512, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        per_track, heads = 255, 16
        cylinders_times_heads = sectors // per_track
    else:
        per_track = 17
        cylinders_times_heads = sectors // per_track
        heads = max(4, (cylinders_times_heads + 1023) // 1024)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            per_track, heads = 31, 16
            cylinders_times_heads = sectors // per_track
        if cylinders_times_heads >= heads * 1024:
            per_track, heads = 63, 16
            cylinders_times_heads = sectors // per_track
    return cylinders_times_heads // heads, heads, per_track


def _rewrite_vhd_footer(footer: bytearray, creator: bytes, size_bytes: int) -> None:
    footer[28:32] = creator
    struct.pack_into(">HBB", footer, 56, *vhd_geometry(size_bytes))
    footer[64:68] = bytes(4)
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)


def make_vhd(
    tmp_dir: str | os.PathLike[str],
    size_bytes: int,
    subformat: str,
    *,
    name: str = "disk",
    seed: int = 0,
    creator: str | None = None,
) -> tuple[str, str]:
    """A VHD whose footer holds exactly ``size_bytes``, and the raw disk it holds.

    Made with qemu-img's ``force_size``, which marks the footer with creator
    ``qem2`` and a maximal geometry. With ``creator`` (four characters, such
    as ``win `` for Hyper-V or ``vbox`` for VirtualBox) the footer is
    rewritten as that tool writes it: its name and the geometry the VHD
    specification computes, which for most sizes is a little smaller.
    """
    raw = make_raw_bytes(Path(tmp_dir) / f"{name}.expected.img", size_bytes, seed)
    target = str(Path(tmp_dir) / f"{name}.vhd")
    options = f"subformat={subformat},force_size=on"
    qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", options, raw, target)
    if creator is not None:
        app = creator.encode("ascii")
        if len(app) != 4:
            raise ValueError(f"a VHD creator application is 4 bytes, not {creator!r}")
        with open(target, "r+b") as image:
            image.seek(-512, os.SEEK_END)
            offsets = [image.tell()]
            image.seek(0)
            if image.read(8) == b"conectix":
                offsets.append(0)
            for offset in offsets:
                image.seek(offset)
                footer = bytearray(image.read(512))
                _rewrite_vhd_footer(footer, app, size_bytes)
                image.seek(offset)
                image.write(footer)
    return target, raw


def make_split_vmdk(
    tmp_dir: str | os.PathLike[str], *, name: str = "split"
) -> tuple[str, int]:
    """A twoGbMaxExtentSparse VMDK over two extents, with data in both.

    Returns the descriptor's path and the virtual size. The disk is 2 GiB +
    4 MiB, mostly unallocated, so its files stay small.
    """
    size = 2048 * MIB + 4 * MIB
    descriptor = str(Path(tmp_dir) / f"{name}.vmdk")
    qemu_img(
        "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
        descriptor, str(size),
    )  # fmt: skip
    subprocess.run(
        [
            "qemu-io", "-f", "vmdk",
            "-c", "write -P 0x11 0 1M",
            "-c", f"write -P 0x22 {2048 * MIB + MIB} 1M",
            descriptor,
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return descriptor, size


_CRC32C_TABLE: list[int] = []


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of VHDX headers."""
    if not _CRC32C_TABLE:
        for index in range(256):
            value = index
            for _ in range(8):
                value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
            _CRC32C_TABLE.append(value)
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def make_dirty_vhdx(tmp_dir: str | os.PathLike[str], *, name: str = "dirty") -> str:
    """A VHDX whose log still needs replaying, as a VM that crashed leaves it.

    qemu writes a log entry for each metadata update, replays it at once and
    then clears the log GUID in the header, leaving the entry in place. Here
    the current header is pointed at that entry's GUID again (its CRC-32C
    recomputed), so the log is valid and unreplayed.
    """
    path = str(Path(tmp_dir) / f"{name}.vhdx")
    qemu_img("create", "-q", "-f", "vhdx", path, "8M")
    subprocess.run(
        ["qemu-io", "-f", "vhdx", "-c", "write -P 0x33 0 1M", path],
        check=True,
        capture_output=True,
    )
    with open(path, "r+b") as image:
        headers = []
        for offset in (64 * 1024, 128 * 1024):
            image.seek(offset)
            header = bytearray(image.read(4096))
            (sequence,) = struct.unpack_from("<Q", header, 8)
            headers.append((sequence, offset, header))
        _, offset, header = max(headers)
        log_length, log_offset = struct.unpack_from("<IQ", header, 68)
        image.seek(log_offset)
        log = image.read(log_length)
        if log[:4] != b"loge":
            raise ValueError(f"no log entry at the start of the log of {path}")
        header[48:64] = log[32:48]
        header[4:8] = bytes(4)
        struct.pack_into("<I", header, 4, crc32c(bytes(header)))
        image.seek(offset)
        image.write(header)
    return path


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
