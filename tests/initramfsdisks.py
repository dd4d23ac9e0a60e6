"""A real Debian guest with a working initramfs-tools, for initramfs tests.

An initramfs tool only proves itself on a real system, so the guest here is
a Debian root made by ``debootstrap --variant=minbase`` from the mirror this
host's apt uses, with ``initramfs-tools`` and ``zstd``. Its kernel comes
from Debian's cloud kernel package (``apt-get download``, the ordinary
client): the real ``/boot/vmlinuz-<kver>`` and ``/boot/config-<kver>`` and a
real subset of its modules, the virtio drivers and ``vmw_pvscsi`` with
everything they depend on, indexed by the guest's own ``depmod``. The guest
is set up as a VMware guest tuned by hand would be: ``MODULES=list`` with
only ``vmw_pvscsi`` listed, and an initramfs built that way, so it holds no
virtio driver until the operation under test adds them.

Building takes about a minute and a half on a 2-core host and downloads
about 60 MB, so the finished root is kept as a tarball under
``$H2K_TEST_CACHE`` (default /var/cache/h2k-test), named by
:data:`ROOT_VERSION`; change that constant to rebuild it. Building needs
root (debootstrap, chroot); each test disk is then made from the tarball
with ``mkfs.ext4 -d`` in a few seconds.

Test helpers: plain ``subprocess`` is fine here, the code under test uses
:func:`h2k.tools.process.run_tool`.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tests.guest.builders import LINUX_FS_GUID, MiB, convert, mkfs_ext4, run

ROOT_VERSION = "debian-initramfs-tools-v1"
CACHE_ENV = "H2K_TEST_CACHE"
DEFAULT_CACHE_DIR = "/var/cache/h2k-test"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The drivers the operation adds, and the one a VMware guest boots from.
VIRTIO_DRIVERS = ("virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci")
VMWARE_DRIVER = "vmw_pvscsi"
# Regenerable or documentation-only files, left out to keep disks small.
TRIMMED = (
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
    "var/cache/apt/*",
    "var/lib/apt/lists/*",
    "usr/lib/udev/hwdb.d/*",
    "usr/lib/udev/hwdb.bin",
    "etc/udev/hwdb.bin",
)
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TMPDIR": "/tmp",
}

ROOT_FS_UUID = "3a1f0c52-7b6e-4d3a-9c8b-2e5f6a7b8c9d"
BOOT_FS_UUID = "5c2e9d41-8a7b-4f6e-b1c2-d3e4f5a6b7c8"
# Sizes in MiB: the root holds ~110 MB, /boot ~30 MB while rebuilding.
ROOT_ONLY_MIB = 256
ROOT_MIB = 208
BOOT_MIB = 48


@dataclass(frozen=True)
class GuestRoot:
    tarball: str
    kernel: str


@dataclass(frozen=True)
class DebianDisk:
    """A converted guest image and what it holds."""

    image: str
    fmt: str
    kernel: str
    separate_boot: bool
    # Byte offset and size of the filesystem holding /boot.
    boot_offset: int
    boot_size: int
    # The path of the initramfs inside that filesystem.
    initramfs: str


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR


def _mirror() -> str:
    """The Debian mirror this host's apt uses, so debootstrap reaches it."""
    found = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path, encoding="utf-8") as f:
            found += re.findall(r"^URIs:\s*(\S+)", f.read(), re.MULTILINE)
    if os.path.exists("/etc/apt/sources.list"):
        with open("/etc/apt/sources.list", encoding="utf-8") as f:
            found += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", f.read(), re.M)
    for uri in found:
        if uri.rstrip("/").endswith("/debian"):
            return uri
    return DEFAULT_MIRROR


def _suite() -> str:
    with open("/etc/os-release", encoding="utf-8") as f:
        match = re.search(r"^VERSION_CODENAME=(\S+)", f.read(), re.MULTILINE)
    return match.group(1) if match else "bookworm"


def _kernel_package() -> str:
    """The versioned kernel package Debian's cloud kernel metapackage names."""
    output = run("apt-cache", "depends", "--important", KERNEL_METAPACKAGE)
    match = re.search(r"Depends:\s*(linux-image-\S+)", output)
    if match is None:
        raise RuntimeError(f"apt knows no {KERNEL_METAPACKAGE}: {output!r}")
    return match.group(1)


def _download_kernel(debs: str) -> str:
    package = _kernel_package()
    existing = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if existing:
        return existing[0]
    subprocess.run(
        ["apt-get", "download", "-o", "APT::Sandbox::User=root", package],
        check=True,
        capture_output=True,
        cwd=debs,
    )
    (deb,) = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    return deb


def chroot(root: str, *argv: str) -> str:
    return run("chroot", root, *argv, env=CHROOT_ENV)


def _module_closure(modules_dir: str, wanted: tuple[str, ...]) -> set[str]:
    """The module files ``wanted`` need, from a modules.dep (paths relative)."""
    deps: dict[str, list[str]] = {}
    with open(os.path.join(modules_dir, "modules.dep"), encoding="utf-8") as f:
        for line in f:
            name, _, needs = line.partition(":")
            deps[name.strip()] = needs.split()
    by_name = {os.path.basename(p).split(".")[0]: p for p in deps}
    todo = [by_name[name] for name in wanted]
    closure: set[str] = set()
    while todo:
        path = todo.pop()
        if path not in closure:
            closure.add(path)
            todo += deps[path]
    return closure


def _install_kernel(root: str, deb: str) -> str:
    """Put the kernel of ``deb`` into ``root``: vmlinuz, config, some modules."""
    staging_rel = "var/tmp/h2k-kernel"
    staging = os.path.join(root, staging_rel)
    run("dpkg-deb", "-x", deb, staging)
    (kernel,) = os.listdir(os.path.join(staging, "lib/modules"))
    # The guest's own depmod indexes the whole tree once, to find what the
    # wanted drivers depend on.
    chroot(root, "depmod", "-b", f"/{staging_rel}", kernel)
    source = os.path.join(staging, "lib/modules", kernel)
    target = os.path.join(root, "usr/lib/modules", kernel)
    for rel in _module_closure(source, (*VIRTIO_DRIVERS, VMWARE_DRIVER)):
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        shutil.copy2(os.path.join(source, rel), os.path.join(target, rel))
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(os.path.join(source, name), os.path.join(target, name))
    for name in (f"vmlinuz-{kernel}", f"config-{kernel}", f"System.map-{kernel}"):
        shutil.copy2(os.path.join(staging, "boot", name), os.path.join(root, "boot"))
    shutil.rmtree(staging)
    chroot(root, "depmod", kernel)
    return kernel


def _configure_initramfs(root: str, kernel: str) -> None:
    """MODULES=list with only the VMware driver, and an initramfs built so."""
    conf = os.path.join(root, "etc/initramfs-tools/initramfs.conf")
    with open(conf, encoding="utf-8") as f:
        text = f.read()
    with open(conf, "w", encoding="utf-8") as f:
        f.write(re.sub(r"^MODULES=.*$", "MODULES=list", text, flags=re.MULTILINE))
    modules = os.path.join(root, "etc/initramfs-tools/modules")
    with open(modules, "a", encoding="utf-8") as f:
        f.write(f"{VMWARE_DRIVER}\n")
    # debootstrap made real /dev nodes, and mkinitramfs needs no /proc.
    chroot(root, "update-initramfs", "-c", "-k", kernel)


def _build(directory: str) -> GuestRoot:
    root = os.path.join(directory, "root")
    debs = os.path.join(cache_dir(), "debs")
    os.makedirs(debs, exist_ok=True)
    run(
        "debootstrap",
        "--variant=minbase",
        "--include=initramfs-tools,zstd",
        f"--cache-dir={debs}",
        _suite(),
        root,
        _mirror(),
    )
    kernel = _install_kernel(root, _download_kernel(debs))
    _configure_initramfs(root, kernel)
    for pattern in TRIMMED:
        for path in glob.glob(os.path.join(root, pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    with open(os.path.join(root, "etc/hostname"), "w", encoding="utf-8") as f:
        f.write("h2k-initramfs-guest\n")
    tarball = os.path.join(directory, "root.tar.zst")
    run("tar", "--zstd", "--numeric-owner", "-C", root, "-cf", tarball, ".")
    return GuestRoot(tarball, kernel)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def guest_root() -> GuestRoot:
    """The cached root tarball, built first when it is missing."""
    directory = cache_dir()
    os.makedirs(directory, exist_ok=True)
    tarball = os.path.join(directory, f"{ROOT_VERSION}.tar.zst")
    kernel_file = os.path.join(directory, f"{ROOT_VERSION}.kernel")
    with _locked(os.path.join(directory, f"{ROOT_VERSION}.lock")):
        if not (os.path.exists(tarball) and os.path.exists(kernel_file)):
            work = os.path.join(directory, f"build-{os.getpid()}")
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            started = time.monotonic()
            try:
                built = _build(work)
                os.replace(built.tarball, tarball)
                with open(kernel_file, "w", encoding="utf-8") as f:
                    f.write(built.kernel)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"built the guest root in {time.monotonic() - started:.0f}s")
    with open(kernel_file, encoding="utf-8") as f:
        return GuestRoot(tarball, f.read().strip())


def _fstab(separate_boot: bool) -> str:
    lines = [f"UUID={ROOT_FS_UUID} / ext4 errors=remount-ro 0 1"]
    if separate_boot:
        lines.append(f"UUID={BOOT_FS_UUID} /boot ext4 defaults 0 2")
    return "\n".join(lines) + "\n"


def debian_disk(
    directory: str,
    *,
    separate_boot: bool,
    extra_files: dict[str, tuple[str, int]] | None = None,
) -> DebianDisk:
    """A GPT VMDK with the cached Debian root; /boot on partition 2 if asked.

    ``extra_files`` maps a guest path to the text and mode of a file to add
    (a broken initramfs hook, say).
    """
    built = guest_root()
    tree = os.path.join(directory, "tree")
    os.makedirs(tree)
    run("tar", "--zstd", "--numeric-owner", "-C", tree, "-xf", built.tarball)
    with open(os.path.join(tree, "etc/fstab"), "w", encoding="utf-8") as f:
        f.write(_fstab(separate_boot))
    for guest, (text, mode) in (extra_files or {}).items():
        path = os.path.join(tree, guest.lstrip("/"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, mode)
    raw = os.path.join(directory, "debian.raw")
    root_mib = ROOT_MIB if separate_boot else ROOT_ONLY_MIB
    total_mib = 2 + root_mib + (BOOT_MIB if separate_boot else 0)
    with open(raw, "wb") as f:
        f.truncate(total_mib * MiB)
    table = f"label: gpt\nstart=2048, size={root_mib * 2048}, type={LINUX_FS_GUID}\n"
    boot_offset = MiB
    boot_size = root_mib * MiB
    initramfs = f"/boot/initrd.img-{built.kernel}"
    if separate_boot:
        boot_offset = (1 + root_mib) * MiB
        boot_size = BOOT_MIB * MiB
        table += f"size={BOOT_MIB * 2048}, type={LINUX_FS_GUID}\n"
        boot_tree = os.path.join(directory, "boot-tree")
        os.rename(os.path.join(tree, "boot"), boot_tree)
        os.mkdir(os.path.join(tree, "boot"), 0o755)
        initramfs = f"/initrd.img-{built.kernel}"
    run("sfdisk", "-q", raw, input=table)
    mkfs_ext4(
        raw,
        offset=MiB,
        size=root_mib * MiB,
        label="root",
        uuid=ROOT_FS_UUID,
        tree=tree,
    )
    if separate_boot:
        mkfs_ext4(
            raw,
            offset=boot_offset,
            size=boot_size,
            label="boot",
            uuid=BOOT_FS_UUID,
            tree=boot_tree,
        )
    image = os.path.join(directory, "debian.vmdk")
    convert(raw, image, "vmdk")
    os.unlink(raw)
    shutil.rmtree(tree)
    if separate_boot:
        shutil.rmtree(boot_tree)
    return DebianDisk(
        image=image,
        fmt="vmdk",
        kernel=built.kernel,
        separate_boot=separate_boot,
        boot_offset=boot_offset,
        boot_size=boot_size,
        initramfs=initramfs,
    )
