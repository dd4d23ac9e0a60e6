"""Realistic Linux guest disks, built with the standard tools, for any test.

A VMware guest moved to KVM carries the habits of its old home: device
names in /etc/fstab and on the kernel command line, network configuration
pinned to a VMware MAC address, VMware tools enabled at boot, no virtio
driver in the initramfs. The disks built here carry all of that, the way a
Rocky Linux 9 and an Ubuntu 22.04 installer would have written it, so the
operations that fix a guest are tested on what they will meet.

Every disk is a small sparse raw file laid out with sfdisk; each filesystem
is filled without mounting (``mkfs.ext4 -d`` from a staging directory,
``mkswap`` on a file copied in with dd); the LVM disk is made with the LVM
tools told not to use device-mapper; the result is converted to VMDK with
qemu-img. :class:`BuiltGuest` says where each filesystem lies and what was
put in it, so tests can check an operation's work with debugfs on the raw
bytes, independently of h2k.

For the tests of the guest operations it also has what they share:
:func:`ops_environment` (a private root with the sessions' work and state
dirs, checked afterwards for leftover mounts, loop devices, FUSE mounts and
processes), :class:`OpsEnv` to build an :class:`OperationContext` (its
progress events kept by :class:`tests.recording.Recorder`), and the
independent readers (:func:`to_raw`, :func:`read_file`,
:func:`partition_regions`, :func:`differing_ranges`, :func:`qemu_img_compare`,
:func:`system_yaml`).

Builders: :func:`rhel_guest` (GPT, separate /boot, SELinux enforcing,
dracut, ifcfg/NetworkManager), :func:`debian_guest` (GPT with a BIOS boot
partition, /boot on the root, netplan/networkd/interfaces, update-initramfs),
:func:`lvm_guest` (Rocky-like with its root on a linear LV),
:func:`empty_guest` (one empty ext4) and :func:`blank_disk` (no filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from h2k.operations.base import OperationContext
from tests.guest.builders import (
    LINUX_FS_GUID,
    LINUX_LVM_GUID,
    MiB,
    convert,
    loop_device,
    lvm,
    pe_start,
    run,
    sfdisk_partitions,
    sparse_file,
)
from tests.guest.builders import to_raw as to_raw
from tests.guest.leaks import Leftovers, assert_clean, isolate_sessions, leftovers
from tests.recording import Recorder

BIOS_BOOT_GUID = "21686148-6449-6E6F-744E-656564454649"
LINUX_SWAP_GUID = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"

RHEL_KERNEL = "5.14.0-362.8.1.el9_3.x86_64"
DEBIAN_KERNEL = "5.15.0-91-generic"
MACHINE_ID = "3f1e2d4c5b6a47988f0e1d2c3b4a5968"

RHEL_BOOT_UUID = "b0a7c5d1-1e2f-4a3b-8c4d-5e6f7a8b9c01"
RHEL_ROOT_UUID = "c1b2a3d4-2f3e-4b4c-9d5e-6f7a8b9c0d12"
RHEL_SWAP_UUID = "d2c3b4a5-3a4f-4c5d-8e6f-7a8b9c0d1e23"
DEBIAN_ROOT_UUID = "e3d4c5b6-4b5a-4d6e-9f7a-8b9c0d1e2f34"
DEBIAN_SWAP_UUID = "f4e5d6c7-5c6b-4e7f-8a8b-9c0d1e2f3a45"
LVM_BOOT_UUID = "a5f6e7d8-6d7c-4f8a-9b9c-0d1e2f3a4b56"
LVM_ROOT_UUID = "b6a7f8e9-7e8d-4a9b-8cad-1e2f3a4b5c67"
LVM_SWAP_UUID = "c7b8a9f0-8f9e-4bac-9dbe-2f3a4b5c6d78"
EMPTY_UUID = "d8c9b0a1-9a0f-4cbd-8ecf-3a4b5c6d7e89"

RHEL_MAC = "00:50:56:ab:cd:ef"
DEBIAN_MAC = "00:50:56:9a:bc:de"
SELINUX_ETC = b"system_u:object_r:etc_t:s0\0"
SELINUX_NM = b"system_u:object_r:NetworkManager_etc_rw_t:s0\0"
# The first bytes of an ELF binary: the tools' binaries look like programs.
ELF_STUB = b"\x7fELF\x02\x01\x01\x00" + bytes(56)


@dataclass(frozen=True)
class Region:
    """``size`` bytes at ``offset`` of the raw disk."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def debugfs_target(self) -> str:
        """How debugfs opens this filesystem inside a raw file (append to it)."""
        return f"?offset={self.offset}"


@dataclass(frozen=True)
class BuiltGuest:
    """A converted guest image and what was put into it.

    ``raw`` is the raw file the image was converted from; ``root`` and
    ``boot`` are the byte ranges of the root and /boot filesystems in it
    (``boot`` is None when /boot lives on the root filesystem).
    """

    image: str
    fmt: str
    raw: str
    flavour: str
    root: Region
    root_uuid: str
    boot: Region | None = None
    boot_uuid: str | None = None
    swap_uuid: str | None = None
    kernel: str | None = None
    mac: str | None = None
    partitions: Mapping[int, Region] = field(default_factory=dict)


@dataclass
class Tree:
    """A filesystem's contents before mkfs: files, symlinks, modes, xattrs."""

    files: dict[str, str | bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)
    modes: dict[str, int] = field(default_factory=dict)
    xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def stage(self, directory: str) -> str:
        """Write the tree under ``directory`` and return it."""
        os.makedirs(directory, exist_ok=True)
        for path in self.directories:
            os.makedirs(_inside(directory, path), exist_ok=True)
        for path, content in self.files.items():
            host = _inside(directory, path)
            os.makedirs(os.path.dirname(host), exist_ok=True)
            data = content.encode() if isinstance(content, str) else content
            with open(host, "wb") as f:
                f.write(data)
            os.chmod(host, self.modes.get(path, 0o644))
        for path, target in self.symlinks.items():
            host = _inside(directory, path)
            os.makedirs(os.path.dirname(host), exist_ok=True)
            os.symlink(target, host)
        for path, attributes in self.xattrs.items():
            for name, value in attributes.items():
                os.setxattr(_inside(directory, path), name, value)
        return directory


def _inside(directory: str, path: str) -> str:
    return os.path.join(directory, path.lstrip("/"))


def grubenv(*lines: str) -> str:
    """A GRUB environment block: exactly 1024 bytes, padded with '#'."""
    text = "# GRUB Environment Block\n" + "".join(f"{line}\n" for line in lines)
    return text + "#" * (1024 - len(text))


# Rocky Linux 9.


def rhel_os_files(tree: Tree, hostname: str, selinux: str = "enforcing") -> None:
    tree.files["/etc/os-release"] = (
        'NAME="Rocky Linux"\n'
        'VERSION="9.3 (Blue Onyx)"\n'
        'ID="rocky"\n'
        'ID_LIKE="rhel centos fedora"\n'
        'VERSION_ID="9.3"\n'
        'PLATFORM_ID="platform:el9"\n'
        'PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n'
        'ANSI_COLOR="0;32"\n'
        'HOME_URL="https://rockylinux.org/"\n'
    )
    tree.files["/etc/redhat-release"] = "Rocky Linux release 9.3 (Blue Onyx)\n"
    tree.files["/etc/hostname"] = f"{hostname}\n"
    tree.files["/etc/machine-id"] = f"{MACHINE_ID}\n"
    tree.symlinks["/lib"] = "usr/lib"
    tree.symlinks["/sbin"] = "usr/sbin"
    tree.symlinks["/bin"] = "usr/bin"
    tree.directories += ["/boot", "/tmp", "/root", "/proc", "/sys", "/dev", "/run"]
    tree.files["/usr/bin/bash"] = ELF_STUB
    tree.modes["/usr/bin/bash"] = 0o755
    modules = f"/usr/lib/modules/{RHEL_KERNEL}"
    tree.files[f"{modules}/modules.dep"] = (
        "kernel/drivers/block/virtio_blk.ko.xz:\nkernel/drivers/net/virtio_net.ko.xz:\n"
    )
    tree.files[f"{modules}/kernel/drivers/block/virtio_blk.ko.xz"] = b""
    tree.files[f"{modules}/kernel/drivers/net/virtio_net.ko.xz"] = b""
    tree.files["/usr/bin/dracut"] = "#!/usr/bin/bash\n# dracut stand-in\nexit 0\n"
    tree.modes["/usr/bin/dracut"] = 0o755
    tree.files["/etc/dracut.conf"] = (
        "# PUT YOUR CONFIG IN separate files\n"
        '# in /etc/dracut.conf.d named "<name>.conf"\n'
    )
    tree.directories.append("/etc/dracut.conf.d")
    tree.xattrs["/etc/dracut.conf.d"] = {"security.selinux": SELINUX_ETC}
    tree.files["/etc/selinux/config"] = (
        "# This file controls the state of SELinux on the system.\n"
        "# SELINUX= can take one of these three values:\n"
        "#     enforcing - SELinux security policy is enforced.\n"
        "#     permissive - SELinux prints warnings instead of enforcing.\n"
        "#     disabled - No SELinux policy is loaded.\n"
        f"SELINUX={selinux}\n"
        "# SELINUXTYPE= can take one of these three values:\n"
        "SELINUXTYPE=targeted\n"
    )


def rhel_grub_defaults(tree: Tree, cmdline: str) -> None:
    tree.files["/etc/default/grub"] = (
        "GRUB_TIMEOUT=5\n"
        "GRUB_DISTRIBUTOR=\"$(sed 's, release .*$,,g' /etc/system-release)\"\n"
        "GRUB_DEFAULT=saved\n"
        "GRUB_DISABLE_SUBMENU=true\n"
        'GRUB_TERMINAL_OUTPUT="console"\n'
        f'GRUB_CMDLINE_LINUX="{cmdline}"\n'
        'GRUB_DISABLE_RECOVERY="true"\n'
        "GRUB_ENABLE_BLSCFG=true\n"
    )
    tree.xattrs["/etc/default/grub"] = {"security.selinux": SELINUX_ETC}
    tree.symlinks["/etc/grub2.cfg"] = "../boot/grub2/grub.cfg"


def rhel_boot_files(tree: Tree, prefix: str, search_uuid: str, cmdline: str) -> None:
    """The files of /boot; ``prefix`` is "" on a separate /boot, else "/boot".

    ``search_uuid`` is the UUID grub.cfg's ``search --fs-uuid`` looks for.
    """
    version = RHEL_KERNEL
    tree.files[f"{prefix}/vmlinuz-{version}"] = ELF_STUB
    tree.files[f"{prefix}/initramfs-{version}.img"] = b"\x1f\x8b\x08\x00initramfs"
    tree.files[f"{prefix}/System.map-{version}"] = "ffffffff81000000 T _text\n"
    tree.files[f"{prefix}/config-{version}"] = (
        "CONFIG_VIRTIO=y\n"
        "CONFIG_VIRTIO_PCI=y\n"
        "CONFIG_VIRTIO_BLK=m\n"
        "CONFIG_SCSI_VIRTIO=m\n"
        "CONFIG_VIRTIO_NET=m\n"
    )
    tree.files[f"{prefix}/vmlinuz-0-rescue-{MACHINE_ID}"] = ELF_STUB
    tree.files[f"{prefix}/initramfs-0-rescue-{MACHINE_ID}.img"] = b"\x1f\x8b\x08\x00"
    tree.files[f"{prefix}/grub2/grub.cfg"] = (
        "#\n"
        "# DO NOT EDIT THIS FILE\n"
        "#\n"
        "# It is automatically generated by grub2-mkconfig using templates\n"
        "# from /etc/grub.d and settings from /etc/default/grub\n"
        "#\n"
        "### BEGIN /etc/grub.d/00_header ###\n"
        "set pager=1\n"
        "if [ -f ${config_directory}/grubenv ]; then\n"
        "  load_env -f ${config_directory}/grubenv\n"
        "elif [ -s $prefix/grubenv ]; then\n"
        "  load_env\n"
        "fi\n"
        "### END /etc/grub.d/00_header ###\n"
        "### BEGIN /etc/grub.d/10_linux ###\n"
        "insmod part_gpt\n"
        "insmod ext2\n"
        "set root='hd0,gpt1'\n"
        "if [ x$feature_platform_search_hint = xy ]; then\n"
        f"  search --no-floppy --fs-uuid --set=root --hint='hd0,gpt1'  {search_uuid}\n"
        "else\n"
        f"  search --no-floppy --fs-uuid --set=root {search_uuid}\n"
        "fi\n"
        'if [ -z "${kernelopts}" ]; then\n'
        f'  set kernelopts="{cmdline} "\n'
        "fi\n"
        "insmod blscfg\n"
        "blscfg\n"
        f"menuentry 'Rocky Linux ({version}) 9.3 (Blue Onyx)' --class rocky {{\n"
        "\tload_video\n"
        f"\tlinux /vmlinuz-{version} {cmdline}\n"
        f"\tinitrd /initramfs-{version}.img\n"
        "}\n"
        "### END /etc/grub.d/10_linux ###\n"
    )
    tree.files[f"{prefix}/grub2/grubenv"] = grubenv(
        f"saved_entry={MACHINE_ID}-{version}",
        f"kernelopts={cmdline}",
        "boot_success=0",
    )
    tree.files[f"{prefix}/grub2/device.map"] = (
        "# this device map was generated by anaconda\n(hd0)      /dev/sda\n"
    )
    for name, title, kernel, initrd in (
        (version, f"Rocky Linux ({version}) 9.3 (Blue Onyx)", version, version),
        (
            "0-rescue",
            f"Rocky Linux (0-rescue-{MACHINE_ID}) 9.3 (Blue Onyx)",
            f"0-rescue-{MACHINE_ID}",
            f"0-rescue-{MACHINE_ID}",
        ),
    ):
        tree.files[f"{prefix}/loader/entries/{MACHINE_ID}-{name}.conf"] = (
            f"title {title}\n"
            f"version {kernel}\n"
            f"linux /vmlinuz-{kernel}\n"
            f"initrd /initramfs-{initrd}.img $tuned_initrd\n"
            f"options {cmdline}\n"
            "grub_users $grub_users\n"
            "grub_arg --unrestricted\n"
            "grub_class rocky\n"
        )


def rhel_network(tree: Tree) -> None:
    tree.files["/etc/sysconfig/network-scripts/ifcfg-ens192"] = (
        "TYPE=Ethernet\n"
        "BOOTPROTO=dhcp\n"
        "NAME=ens192\n"
        "DEVICE=ens192\n"
        "ONBOOT=yes\n"
        f'HWADDR="{RHEL_MAC.upper()}"\n'
    )
    tree.xattrs["/etc/sysconfig/network-scripts/ifcfg-ens192"] = {
        "security.selinux": b"system_u:object_r:net_conf_t:s0\0"
    }
    keyfile = "/etc/NetworkManager/system-connections/ens192.nmconnection"
    tree.files[keyfile] = (
        "[connection]\n"
        "id=ens192\n"
        "uuid=4b1d7f3c-8a3e-4b0f-9d7e-2c1b0a9f8e7d\n"
        "type=ethernet\n"
        "interface-name=ens192\n"
        "\n"
        "[ethernet]\n"
        f"mac-address={RHEL_MAC.upper()}\n"
        "\n"
        "[ipv4]\n"
        "method=auto\n"
        "\n"
        "[ipv6]\n"
        "addr-gen-mode=eui64\n"
        "method=auto\n"
    )
    tree.modes[keyfile] = 0o600
    tree.xattrs[keyfile] = {"security.selinux": SELINUX_NM}
    tree.files["/etc/udev/rules.d/70-persistent-net.rules"] = (
        "# This file was automatically generated by the /lib/udev/write_net_rules\n"
        "# program, run by the persistent-net-generator.rules rules file.\n"
        "\n"
        "# PCI device 0x15ad:0x07b0 (vmxnet3)\n"
        'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", '
        f'ATTR{{address}}=="{RHEL_MAC}", ATTR{{type}}=="1", KERNEL=="eth*", '
        'NAME="eth0"\n'
    )
    tree.files["/etc/udev/rules.d/60-local-disk.rules"] = (
        'ACTION=="add", SUBSYSTEM=="block", ATTR{queue/scheduler}="none"\n'
    )


def rhel_vmware_tools(tree: Tree) -> None:
    for name in ("vmtoolsd", "vmware-toolbox-cmd", "vmware-checkvm", "VGAuthService"):
        tree.files[f"/usr/bin/{name}"] = ELF_STUB
        tree.modes[f"/usr/bin/{name}"] = 0o755
    tree.files["/etc/vmware-tools/tools.conf"] = "[logging]\nlog = true\n"
    tree.files["/etc/vmware-tools/vgauth.conf"] = "[service]\nsamlSchemaDir = x\n"
    tree.files["/usr/lib/systemd/system/vmtoolsd.service"] = (
        "[Unit]\n"
        "Description=Service for virtual machines hosted on VMware\n"
        "ConditionVirtualization=vmware\n"
        "Requires=vgauthd.service\n"
        "\n[Service]\nExecStart=/usr/bin/vmtoolsd\n"
        "\n[Install]\nWantedBy=multi-user.target\n"
    )
    tree.files["/usr/lib/systemd/system/vgauthd.service"] = (
        "[Unit]\nDescription=VGAuth Service for open-vm-tools\n"
        "\n[Service]\nExecStart=/usr/bin/VGAuthService -s\n"
    )
    tree.files["/usr/lib/systemd/system/sshd.service"] = (
        "[Unit]\nDescription=OpenSSH server daemon\n"
        "\n[Service]\nExecStart=/usr/sbin/sshd -D\n"
        "\n[Install]\nWantedBy=multi-user.target\n"
    )
    wants = "/etc/systemd/system/multi-user.target.wants"
    tree.symlinks[f"{wants}/vmtoolsd.service"] = (
        "/usr/lib/systemd/system/vmtoolsd.service"
    )
    tree.symlinks[f"{wants}/sshd.service"] = "/usr/lib/systemd/system/sshd.service"
    tree.symlinks["/etc/systemd/system/vmtoolsd.service.requires/vgauthd.service"] = (
        "/usr/lib/systemd/system/vgauthd.service"
    )
    tree.files["/usr/share/licenses/open-vm-tools/COPYING"] = "LGPL-2.1\n"


def rhel_root_tree(
    *,
    hostname: str,
    fstab: str,
    cmdline: str,
    separate_boot: bool,
    boot_uuid: str,
    selinux: str = "enforcing",
) -> Tree:
    tree = Tree()
    rhel_os_files(tree, hostname, selinux)
    rhel_grub_defaults(tree, cmdline)
    rhel_network(tree)
    rhel_vmware_tools(tree)
    tree.files["/etc/fstab"] = fstab
    tree.xattrs["/etc/fstab"] = {"security.selinux": SELINUX_ETC}
    if not separate_boot:
        rhel_boot_files(tree, "/boot", boot_uuid, cmdline)
    return tree


def rhel_fstab(root: str, boot: str, swap: str) -> str:
    return (
        "\n"
        "#\n"
        "# /etc/fstab\n"
        "# Created by anaconda on Tue Nov 21 10:12:03 2023\n"
        "#\n"
        "# Accessible filesystems, by reference, are maintained under '/dev/disk/'.\n"
        "# See man pages fstab(5), findfs(8), mount(8) and/or blkid(8) for more info.\n"
        "#\n"
        f"{root}   /                       ext4    defaults        1 1\n"
        f"{boot}   /boot                   ext4    defaults,nodev  1 2\n"
        f"{swap}   none                    swap    defaults        0 0\n"
        "tmpfs       /dev/shm                tmpfs   defaults,noexec 0 0\n"
    )


# Disk assembly.


def _mkfs(raw: str, region: Region, *, label: str, uuid: str, tree: str | None):
    argv = ["mkfs.ext4", "-q", "-F", "-L", label, "-U", uuid]
    if tree is not None:
        argv += ["-d", tree]
    argv += ["-E", f"offset={region.offset}", raw, f"{region.size // 1024}k"]
    run(*argv)


def _mkswap(directory: str, raw: str, region: Region, uuid: str) -> None:
    swap = os.path.join(directory, "swap.part")
    sparse_file(swap, region.size)
    run("mkswap", "-U", uuid, "-L", "swap", swap)
    run(
        "dd",
        f"if={swap}",
        f"of={raw}",
        "bs=64K",
        f"seek={region.offset // (64 * 1024)}",
        "conv=notrunc,sparse",
    )
    os.unlink(swap)


def _partition(raw: str, size: int, rows: list[str]) -> dict[int, Region]:
    sparse_file(raw, size)
    run("sfdisk", "-q", raw, input="label: gpt\n" + "".join(f"{r}\n" for r in rows))
    return partition_regions(raw)


def _finish(directory: str, raw: str, name: str) -> str:
    image = os.path.join(directory, f"{name}.vmdk")
    convert(raw, image, "vmdk")
    for staging in ("stage-root", "stage-boot"):
        shutil.rmtree(os.path.join(directory, staging), ignore_errors=True)
    return image


def rhel_guest(
    directory: str,
    *,
    name: str = "rocky",
    root_arg: str = "/dev/sda2",
    resume_arg: str = "/dev/sda3",
    search_uuid: str = RHEL_BOOT_UUID,
    selinux: str = "enforcing",
) -> BuiltGuest:
    """Rocky Linux 9 on 64 MiB of GPT: /boot (sda1), / (sda2), swap (sda3).

    Device names everywhere (fstab, grub.cfg, grubenv, BLS entries,
    /etc/default/grub name ``root=/dev/sda2``); ``root_arg`` and
    ``resume_arg`` change what the kernel command lines name, ``search_uuid``
    what grub.cfg searches for, ``selinux`` the SELinux mode. ifcfg and a
    NetworkManager keyfile pinned to a VMware MAC, a persistent-net udev
    rule, open-vm-tools enabled, SELinux enforcing, dracut without virtio.
    """
    os.makedirs(directory, exist_ok=True)
    raw = os.path.join(directory, f"{name}.raw")
    parts = _partition(
        raw,
        64 * MiB,
        [
            f'start=2048, size=32768, type={LINUX_FS_GUID}, name="boot"',
            f'start=34816, size=81920, type={LINUX_FS_GUID}, name="root"',
            f'start=116736, size=12288, type={LINUX_SWAP_GUID}, name="swap"',
        ],
    )
    cmdline = f"root={root_arg} ro crashkernel=auto resume={resume_arg} rhgb quiet"
    root_tree = rhel_root_tree(
        hostname="rocky-vm01",
        fstab=rhel_fstab("/dev/sda2", "/dev/sda1", "/dev/sda3"),
        cmdline=cmdline,
        separate_boot=True,
        boot_uuid=RHEL_BOOT_UUID,
        selinux=selinux,
    )
    return _rhel_disk(
        directory,
        raw,
        name,
        flavour="rhel",
        parts=parts,
        placed=(parts[2], parts[3]),
        uuids=(RHEL_BOOT_UUID, RHEL_ROOT_UUID, RHEL_SWAP_UUID),
        root_tree=root_tree,
        boot_files=(search_uuid, cmdline),
    )


def _rhel_disk(
    directory: str,
    raw: str,
    name: str,
    *,
    flavour: str,
    parts: dict[int, Region],
    placed: tuple[Region, Region],
    uuids: tuple[str, str, str],
    root_tree: Tree,
    boot_files: tuple[str, str],
) -> BuiltGuest:
    """A Rocky guest's filesystems written and the disk converted.

    /boot is partition 1; ``placed`` are the root's and the swap's regions;
    ``uuids`` those of /boot, the root and the swap; ``boot_files`` the UUID
    grub.cfg searches for and the kernel command line.
    """
    root, swap = placed
    boot_uuid, root_uuid, swap_uuid = uuids
    boot_tree = Tree()
    rhel_boot_files(boot_tree, "", *boot_files)
    _mkfs(
        raw,
        parts[1],
        label="boot",
        uuid=boot_uuid,
        tree=boot_tree.stage(os.path.join(directory, "stage-boot")),
    )
    _mkfs(
        raw,
        root,
        label="root",
        uuid=root_uuid,
        tree=root_tree.stage(os.path.join(directory, "stage-root")),
    )
    _mkswap(directory, raw, swap, swap_uuid)
    return BuiltGuest(
        image=_finish(directory, raw, name),
        fmt="vmdk",
        raw=raw,
        flavour=flavour,
        root=root,
        root_uuid=root_uuid,
        boot=parts[1],
        boot_uuid=boot_uuid,
        swap_uuid=swap_uuid,
        kernel=RHEL_KERNEL,
        mac=RHEL_MAC,
        partitions=parts,
    )


# Ubuntu 22.04.


def debian_root_tree() -> Tree:
    tree = Tree()
    version = DEBIAN_KERNEL
    tree.files["/etc/os-release"] = (
        'PRETTY_NAME="Ubuntu 22.04.3 LTS"\n'
        'NAME="Ubuntu"\n'
        'VERSION_ID="22.04"\n'
        'VERSION="22.04.3 LTS (Jammy Jellyfish)"\n'
        "VERSION_CODENAME=jammy\n"
        "ID=ubuntu\n"
        "ID_LIKE=debian\n"
        'HOME_URL="https://www.ubuntu.com/"\n'
        "UBUNTU_CODENAME=jammy\n"
    )
    tree.files["/etc/hostname"] = "ubuntu-vm02\n"
    tree.files["/etc/fstab"] = (
        "# /etc/fstab: static file system information.\n"
        "#\n"
        "# Use 'blkid' to print the universally unique identifier for a\n"
        "# device; this may be used with UUID= as a more robust way to name devices\n"
        "# that works even if disks are added and removed. See fstab(5).\n"
        "#\n"
        "# <file system> <mount point>   <type>  <options>       <dump>  <pass>\n"
        "/dev/sda2\t/\text4\terrors=remount-ro\t0\t1\n"
        "/dev/sda3\tnone\tswap\tsw\t0\t0\n"
        "/dev/sr0        /media/cdrom0   udf,iso9660 user,noauto     0       0\n"
    )
    tree.directories += ["/tmp", "/root", "/proc", "/sys", "/dev", "/run", "/bin"]
    tree.files["/usr/bin/bash"] = ELF_STUB
    tree.modes["/usr/bin/bash"] = 0o755
    tree.files[f"/boot/vmlinuz-{version}"] = ELF_STUB
    tree.files[f"/boot/initrd.img-{version}"] = b"\x1f\x8b\x08\x00initrd"
    tree.files[f"/boot/config-{version}"] = (
        "CONFIG_VIRTIO=y\nCONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_BLK=m\n"
        "CONFIG_SCSI_VIRTIO=m\nCONFIG_VIRTIO_NET=m\n"
    )
    tree.symlinks["/boot/vmlinuz"] = f"vmlinuz-{version}"
    tree.symlinks["/boot/initrd.img"] = f"initrd.img-{version}"
    tree.files[f"/lib/modules/{version}/modules.dep"] = (
        "kernel/drivers/block/virtio_blk.ko:\n"
    )
    tree.files["/boot/grub/grub.cfg"] = (
        "#\n# DO NOT EDIT THIS FILE\n#\n"
        "### BEGIN /etc/grub.d/10_linux ###\n"
        "menuentry 'Ubuntu' --class ubuntu --class gnu-linux --class gnu "
        f"--class os $menuentry_id_option 'gnulinux-simple-{DEBIAN_ROOT_UUID}' {{\n"
        "\trecordfail\n"
        "\tload_video\n"
        "\tinsmod gzio\n"
        "\tinsmod part_gpt\n"
        "\tinsmod ext2\n"
        "\tset root='hd0,gpt2'\n"
        f"\tsearch --no-floppy --fs-uuid --set=root {DEBIAN_ROOT_UUID}\n"
        f"\tlinux\t/boot/vmlinuz-{version} root=/dev/sda2 ro  quiet splash "
        "$vt_handoff\n"
        f"\tinitrd\t/boot/initrd.img-{version}\n"
        "}\n"
        "### END /etc/grub.d/10_linux ###\n"
    )
    tree.files["/boot/grub/grubenv"] = grubenv()
    tree.files["/boot/grub/device.map"] = "(hd0)\t/dev/sda\n"
    tree.files["/etc/default/grub"] = (
        "# If you change this file, run 'update-grub' afterwards to update\n"
        "# /boot/grub/grub.cfg.\n"
        "GRUB_DEFAULT=0\n"
        "GRUB_TIMEOUT_STYLE=hidden\n"
        "GRUB_TIMEOUT=0\n"
        "GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n"
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet splash"\n'
        'GRUB_CMDLINE_LINUX="root=/dev/sda2 resume=/dev/sda3"\n'
    )
    tree.files["/usr/sbin/update-initramfs"] = "#!/bin/sh\nexit 0\n"
    tree.modes["/usr/sbin/update-initramfs"] = 0o755
    tree.files["/etc/initramfs-tools/initramfs.conf"] = (
        "#\n# initramfs.conf\n# Configuration file for mkinitramfs(8).\n#\n"
        "# MODULES: [ most | netboot | dep | list ]\n"
        "MODULES=dep\n"
        "BUSYBOX=auto\n"
        "COMPRESS=zstd\n"
    )
    tree.files["/etc/initramfs-tools/modules"] = (
        "# List of modules that you want to include in your initramfs.\n"
        "# They will be loaded at boot time in the order below.\n"
        "#\n"
        "# Syntax:  module_name [args ...]\n"
        "#\n"
        "# You must run update-initramfs(8) to effect this change.\n"
        "#\n"
        "dm_mod\n"
    )
    debian_network(tree)
    debian_vmware_tools(tree)
    return tree


def debian_network(tree: Tree) -> None:
    tree.files["/etc/netplan/00-installer-config.yaml"] = (
        "# This is the network config written by 'subiquity'\n"
        "network:\n"
        "  ethernets:\n"
        "    ens160:\n"
        "      match:\n"
        f"        macaddress: {DEBIAN_MAC}\n"
        "      set-name: ens160\n"
        "      dhcp4: true\n"
        "      nameservers:\n"
        "        addresses:\n"
        "        - 192.0.2.53\n"
        "  version: 2\n"
    )
    tree.modes["/etc/netplan/00-installer-config.yaml"] = 0o600
    tree.files["/etc/netplan/50-storage.yaml"] = (
        "network:\n"
        "  version: 2\n"
        "  ethernets:\n"
        "    storage0:\n"
        "      match: {macaddress: '00:50:56:9a:00:01', driver: vmxnet3}\n"
        "      addresses: [198.51.100.10/24]\n"
        "    storage1:\n"
        "      match: {macaddress: '00:50:56:9a:00:02'}\n"
        "      addresses: [198.51.100.11/24]\n"
    )
    tree.modes["/etc/netplan/50-storage.yaml"] = 0o600
    tree.files["/etc/systemd/network/10-ens160.network"] = (
        f"[Match]\nMACAddress={DEBIAN_MAC}\n\n[Network]\nDHCP=yes\n"
    )
    tree.files["/etc/systemd/network/10-ens160.link"] = (
        f"[Match]\nMACAddress={DEBIAN_MAC}\n\n[Link]\nName=ens160\n"
    )
    tree.files["/etc/systemd/network/20-lan.network"] = (
        "[Match]\nName=lan*\n\n[Network]\nDHCP=yes\n"
    )
    tree.files["/etc/udev/rules.d/70-persistent-net.rules"] = (
        'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", '
        f'ATTR{{address}}=="{DEBIAN_MAC}", NAME="ens160"\n'
    )
    tree.files["/etc/network/interfaces"] = (
        "# interfaces(5) file used by ifup(8) and ifdown(8)\n"
        "source /etc/network/interfaces.d/*\n"
        "\n"
        "auto lo\n"
        "iface lo inet loopback\n"
        "\n"
        "auto ens160\n"
        "iface ens160 inet dhcp\n"
        f"    hwaddress ether {DEBIAN_MAC}\n"
    )


def debian_vmware_tools(tree: Tree) -> None:
    for name in ("vmtoolsd", "vmware-toolbox-cmd", "vmware-hgfsclient"):
        tree.files[f"/usr/bin/{name}"] = ELF_STUB
        tree.modes[f"/usr/bin/{name}"] = 0o755
    tree.files["/etc/vmware-tools/tools.conf.example"] = "[logging]\n"
    tree.files["/lib/systemd/system/open-vm-tools.service"] = (
        "[Unit]\nDescription=Service for virtual machines hosted on VMware\n"
        "Requires=vgauth.service\n"
        "\n[Service]\nExecStart=/usr/bin/vmtoolsd\n"
        "\n[Install]\nWantedBy=multi-user.target\nAlias=vmtoolsd.service\n"
    )
    tree.files["/lib/systemd/system/vgauth.service"] = (
        "[Unit]\nDescription=Authentication service for virtual machines\n"
        "\n[Service]\nExecStart=/usr/bin/VGAuthService\n"
    )
    tree.files["/lib/systemd/system/cron.service"] = (
        "[Unit]\nDescription=Regular background program processing daemon\n"
        "\n[Service]\nExecStart=/usr/sbin/cron -f\n"
    )
    tree.symlinks[
        "/etc/systemd/system/multi-user.target.wants/open-vm-tools.service"
    ] = "/lib/systemd/system/open-vm-tools.service"
    tree.symlinks["/etc/systemd/system/vmtoolsd.service"] = (
        "/lib/systemd/system/open-vm-tools.service"
    )
    tree.symlinks["/etc/systemd/system/multi-user.target.wants/cron.service"] = (
        "/lib/systemd/system/cron.service"
    )
    tree.symlinks[
        "/etc/systemd/system/open-vm-tools.service.requires/vgauth.service"
    ] = "/lib/systemd/system/vgauth.service"
    tree.files["/var/lib/dpkg/info/open-vm-tools.list"] = (
        "/usr/bin/vmtoolsd\n/usr/bin/vmware-toolbox-cmd\n"
        "/lib/systemd/system/open-vm-tools.service\n"
    )


def debian_guest(directory: str, *, name: str = "ubuntu") -> BuiltGuest:
    """Ubuntu 22.04 on 64 MiB of GPT: BIOS boot (sda1), / (sda2), swap (sda3).

    /boot lives on the root; grub.cfg and /etc/default/grub name
    ``root=/dev/sda2``; netplan (block and flow style), systemd-networkd
    ``.network``/``.link``, a persistent-net rule and ifupdown's
    ``hwaddress`` all pin a VMware MAC; open-vm-tools (dpkg) is enabled;
    update-initramfs with ``MODULES=dep``; no SELinux.
    """
    os.makedirs(directory, exist_ok=True)
    raw = os.path.join(directory, f"{name}.raw")
    parts = _partition(
        raw,
        64 * MiB,
        [
            f"start=2048, size=2048, type={BIOS_BOOT_GUID}",
            f'start=4096, size=110592, type={LINUX_FS_GUID}, name="root"',
            f'start=114688, size=14336, type={LINUX_SWAP_GUID}, name="swap"',
        ],
    )
    _mkfs(
        raw,
        parts[2],
        label="cloudimg-rootfs",
        uuid=DEBIAN_ROOT_UUID,
        tree=debian_root_tree().stage(os.path.join(directory, "stage-root")),
    )
    _mkswap(directory, raw, parts[3], DEBIAN_SWAP_UUID)
    return BuiltGuest(
        image=_finish(directory, raw, name),
        fmt="vmdk",
        raw=raw,
        flavour="debian",
        root=parts[2],
        root_uuid=DEBIAN_ROOT_UUID,
        swap_uuid=DEBIAN_SWAP_UUID,
        kernel=DEBIAN_KERNEL,
        mac=DEBIAN_MAC,
        partitions=parts,
    )


# Rocky Linux with its root on LVM.


def _make_volume_group(directory: str, raw: str, pv: Region) -> int:
    """VG "rl" on ``pv`` with LVs root (32 MiB) and swap (8 MiB); pe_start."""
    system_dir = os.path.join(directory, "lvm-system")
    os.makedirs(system_dir, exist_ok=True)
    inactive = ("--activate", "n", "--zero", "n")
    with loop_device(raw, pv.offset, pv.size) as loop:
        lvm(loop, system_dir, "pvcreate", loop)
        lvm(loop, system_dir, "vgcreate", "-s", "4M", "rl", loop)
        lvm(loop, system_dir, "lvcreate", *inactive, "-L", "32M", "-n", "root", "rl")
        lvm(loop, system_dir, "lvcreate", *inactive, "-L", "8M", "-n", "swap", "rl")
        first = pe_start(loop, system_dir)
    shutil.rmtree(system_dir, ignore_errors=True)
    return first


def lvm_guest(directory: str, *, name: str = "rocky-lvm") -> BuiltGuest:
    """Rocky Linux 9 on 64 MiB of GPT: /boot (sda1) and an LVM PV (sda2).

    VG ``rl``: ``root`` (ext4, linear, the first 32 MiB of extents) and
    ``swap``. fstab names the root and swap by their stable
    /dev/mapper names but /boot as ``/dev/sda1``; the kernel command line
    names ``root=/dev/mapper/rl-root``.
    """
    os.makedirs(directory, exist_ok=True)
    raw = os.path.join(directory, f"{name}.raw")
    parts = _partition(
        raw,
        64 * MiB,
        [
            f'start=2048, size=32768, type={LINUX_FS_GUID}, name="boot"',
            f"start=34816, size=94208, type={LINUX_LVM_GUID}",
        ],
    )
    first_extent = _make_volume_group(directory, raw, parts[2])
    root = Region(parts[2].offset + first_extent, 32 * MiB)
    swap = Region(root.end, 8 * MiB)
    cmdline = (
        "root=/dev/mapper/rl-root ro crashkernel=auto resume=/dev/mapper/rl-swap "
        "rd.lvm.lv=rl/root rd.lvm.lv=rl/swap rhgb quiet"
    )
    root_tree = rhel_root_tree(
        hostname="rocky-lvm",
        fstab=rhel_fstab("/dev/mapper/rl-root", "/dev/sda1", "/dev/mapper/rl-swap"),
        cmdline=cmdline,
        separate_boot=True,
        boot_uuid=LVM_BOOT_UUID,
    )
    return _rhel_disk(
        directory,
        raw,
        name,
        flavour="rhel-lvm",
        parts=parts,
        placed=(root, swap),
        uuids=(LVM_BOOT_UUID, LVM_ROOT_UUID, LVM_SWAP_UUID),
        root_tree=root_tree,
        boot_files=(LVM_BOOT_UUID, cmdline),
    )


# Disks without an operating system.


def empty_guest(directory: str, *, name: str = "empty") -> BuiltGuest:
    """32 MiB of GPT with one empty ext4 (label "data"): no operating system."""
    os.makedirs(directory, exist_ok=True)
    raw = os.path.join(directory, f"{name}.raw")
    parts = _partition(
        raw, 32 * MiB, [f'start=2048, size=57344, type={LINUX_FS_GUID}, name="data"']
    )
    _mkfs(raw, parts[1], label="data", uuid=EMPTY_UUID, tree=None)
    return BuiltGuest(
        image=_finish(directory, raw, name),
        fmt="vmdk",
        raw=raw,
        flavour="empty",
        root=parts[1],
        root_uuid=EMPTY_UUID,
        partitions=parts,
    )


def blank_disk(directory: str, *, name: str = "blank") -> str:
    """A 16 MiB VMDK of zeros: no partition table, no filesystem."""
    os.makedirs(directory, exist_ok=True)
    image = os.path.join(directory, f"{name}.vmdk")
    run("qemu-img", "create", "-q", "-f", "vmdk", image, "16M")
    return image


# Reading results back, independently of h2k.


def debugfs(raw: str, region: Region, command: str) -> str:
    """Run a debugfs request on the ext4 at ``region`` of ``raw``, read-only."""
    return run("debugfs", "-R", command, raw + region.debugfs_target)


def read_file(raw: str, region: Region, path: str) -> str | None:
    """The file at ``path`` of the ext4 at ``region``, None when absent."""
    listing = debugfs(raw, region, f"stat {path}")
    if not listing.strip():
        return None
    return debugfs(raw, region, f"cat {path}")


def exists(raw: str, region: Region, path: str) -> bool:
    return bool(debugfs(raw, region, f"stat {path}").strip())


def blkid_uuid(raw: str, region: Region) -> str:
    return run(
        "blkid",
        "--probe",
        "--offset",
        str(region.offset),
        "--size",
        str(region.size),
        "-s",
        "UUID",
        "-o",
        "value",
        raw,
    ).strip()


def partition_regions(raw: str) -> dict[int, Region]:
    """The partitions of ``raw`` in bytes, as ``sfdisk --json`` reads them."""
    return {n: Region(*extent) for n, extent in sfdisk_partitions(raw).items()}


def differing_ranges(first: str, second: str, chunk: int = 4096) -> list[Region]:
    """The byte ranges in which two raw files differ, ``chunk`` at a time."""
    found: list[Region] = []
    with open(first, "rb") as a, open(second, "rb") as b:
        offset = 0
        while True:
            left, right = a.read(chunk), b.read(chunk)
            if not left and not right:
                return found
            if left != right:
                if found and found[-1].end == offset:
                    last = found.pop()
                    found.append(Region(last.offset, last.size + chunk))
                else:
                    found.append(Region(offset, chunk))
            offset += chunk


def inside(ranges: list[Region], allowed: list[Region]) -> bool:
    """True when every range lies wholly inside one of ``allowed``."""
    return all(
        any(r.offset >= a.offset and r.end <= a.end for a in allowed) for r in ranges
    )


@dataclass(frozen=True)
class Compared:
    """``qemu-img compare``'s verdict: 0 identical, 1 different."""

    status: int
    message: str

    @property
    def first_difference(self) -> int | None:
        match = re.search(r"offset (\d+)", self.message)
        return None if match is None else int(match.group(1))


def qemu_img_compare(
    first: str, first_fmt: str, second: str, second_fmt: str
) -> Compared:
    result = subprocess.run(
        ["qemu-img", "compare", "-f", first_fmt, "-F", second_fmt, first, second],
        capture_output=True,
        text=True,
        env=dict(os.environ, LC_ALL="C"),
    )
    return Compared(result.returncode, (result.stdout + result.stderr).strip())


def system_yaml(text: str) -> object:
    """``text`` parsed by the host's own PyYAML (python3-yaml), not h2k's code."""
    output = run(
        "/usr/bin/python3",
        "-c",
        "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        input=text,
    )
    return json.loads(output)


def system_yaml_available() -> bool:
    try:
        run("/usr/bin/python3", "-c", "import yaml")
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


# Running operations the way a worker does, and checking what they leave.


@dataclass
class OpsEnv:
    """A test's private root: images, the sessions' work and state dirs."""

    root: str
    workdir: str
    state_dir: str

    def copy(self, guest: BuiltGuest | str, name: str | None = None) -> str:
        """A private copy of a guest image inside the root."""
        source = guest if isinstance(guest, str) else guest.image
        target = os.path.join(self.root, name or os.path.basename(source))
        shutil.copyfile(source, target)
        return target

    def context(
        self,
        operation: str,
        image: str,
        fmt: str = "vmdk",
        *,
        should_stop: Callable[[], bool] | None = None,
        recorder: Recorder | None = None,
        **parameters: Any,
    ) -> tuple[OperationContext, Recorder]:
        recorder = recorder or Recorder()
        ctx = OperationContext(
            job_id=f"test-{operation}",
            spec={
                "job_id": f"test-{operation}",
                "operation": operation,
                "image": {"path": image, "format": fmt},
                "parameters": parameters,
                "execution_policy": {"timeout_seconds": 300},
            },
            report=recorder,
            should_stop=should_stop or (lambda: False),
            allowed_roots=(self.root,),
        )
        return ctx, recorder

    def files(self) -> list[str]:
        """The files in the root (not the work and state dirs)."""
        return sorted(
            name
            for name in os.listdir(self.root)
            if name not in (os.path.basename(self.workdir), "state")
        )

    def leftovers(self) -> Leftovers:
        return leftovers(self.root)


@contextlib.contextmanager
def ops_environment(
    tmp_path: str | os.PathLike[str], monkeypatch: Any
) -> Iterator[OpsEnv]:
    """Sessions get their work and state dirs inside ``tmp_path``; afterwards
    nothing of them may remain: no mount, FUSE mount, loop device, process,
    ledger, or session directory."""
    root = os.path.realpath(str(tmp_path))
    env = OpsEnv(root, os.path.join(root, "work"), os.path.join(root, "state"))
    os.makedirs(env.workdir)
    os.makedirs(env.state_dir)
    isolate_sessions(monkeypatch, env.workdir, env.state_dir)
    yield env
    assert_clean(env.root, env.workdir, env.state_dir)
