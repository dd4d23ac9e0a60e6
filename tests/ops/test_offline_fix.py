"""offline_fix on real guest disks, its work read back with independent tools.

Each run's output (the qcow2 overlay, or the image changed in place) is
converted to raw with qemu-img, and the guest's files are read from the raw
bytes with debugfs at the partition offsets sfdisk reports (or, for the
LVM root, at the offset the builder computed from LVM's own report). A
byte-for-byte comparison with the source's raw file proves that nothing
outside the filesystems a fix had to change was written.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from h2k.errors import OperationError
from h2k.guestos.access import DiskFacts, require_linux
from h2k.guestos.devices import DeviceIndex
from h2k.guestos.find_root import WINDOWS, RootSearch
from h2k.guestos.tree import GuestTree
from h2k.operations import codes, inspect, offline_fix
from tests import guestdisks
from tests.guest.builders import run, sha256
from tests.recording import Recorder, StopAfter

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"
)

ALL_FIXES = ["fstab", "bootloader", "vmware_tools", "network", "initramfs_config"]


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("offline-fix-disks")
    return {
        "rhel": guestdisks.rhel_guest(str(base / "rhel")),
        "debian": guestdisks.debian_guest(str(base / "debian")),
        "lvm": guestdisks.lvm_guest(str(base / "lvm")),
        "empty": guestdisks.empty_guest(str(base / "empty")),
    }


def fix(
    env: guestdisks.OpsEnv, image: str, fmt: str = "vmdk", **kwargs: Any
) -> tuple[dict[str, Any], Recorder]:
    ctx, recorder = env.context("offline_fix", image, fmt, **kwargs)
    return offline_fix.run(ctx), recorder


def overlay_raw(env: guestdisks.OpsEnv, result: dict[str, Any]) -> str:
    output = result["output"]
    return guestdisks.to_raw(output["path"], output["format"], env.root)


def read(raw: str, region: guestdisks.Region, path: str) -> str | None:
    return guestdisks.read_file(raw, region, path)


def test_all_fixes_on_a_rocky_guest(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["rhel"]
    image = env.copy(guest)
    source_sha = sha256(image)

    result, recorder = fix(env, image)

    assert sha256(image) == source_sha
    assert recorder.phases == [
        "validation",
        "opening",
        "discovery",
        "planning",
        "applying",
        "finalize",
    ]
    json.dumps(result)
    output = result["output"]
    assert output["path"] == os.path.join(env.root, "rocky.offline_fix.qcow2")
    assert output["backing_file"] == image and not output["source_modified"]
    info = json.loads(run("qemu-img", "info", "--output=json", output["path"]))
    assert info["format"] == "qcow2" and info["backing-filename"] == image
    run("qemu-img", "check", "-f", "qcow2", output["path"])
    assert env.files() == sorted([os.path.basename(image), "rocky.offline_fix.qcow2"])
    assert result["applied"] and result["fixes_requested"] == ALL_FIXES
    assert {name: f["status"] for name, f in result["fixes"].items()} == {
        name: "changed" for name in ALL_FIXES
    }

    raw = overlay_raw(env, result)
    regions = guestdisks.partition_regions(raw)
    root, boot = regions[2], regions[1]
    assert (root, boot) == (guest.root, guest.boot)

    # fstab: device names became UUIDs, every other byte kept.
    original = read(guest.raw, root, "/etc/fstab")
    assert original is not None
    expected = (
        original.replace("/dev/sda2   /", f"UUID={guest.root_uuid}   /")
        .replace("/dev/sda1   /boot", f"UUID={guest.boot_uuid}   /boot")
        .replace("/dev/sda3   none", f"UUID={guest.swap_uuid}   none")
    )
    assert read(raw, root, "/etc/fstab") == expected
    assert "security.selinux" in guestdisks.debugfs(raw, root, "ea_list /etc/fstab")
    assert result["fixes"]["fstab"]["changes"][0]["before"] == original

    # Boot configuration, on the separate /boot and on the root.
    uuid_root = f"root=UUID={guest.root_uuid}"
    uuid_resume = f"resume=UUID={guest.swap_uuid}"
    for region, path in (
        (boot, "/grub2/grub.cfg"),
        (boot, "/grub2/grubenv"),
        (boot, f"/loader/entries/{guestdisks.MACHINE_ID}-{guest.kernel}.conf"),
        (boot, f"/loader/entries/{guestdisks.MACHINE_ID}-0-rescue.conf"),
        (root, "/etc/default/grub"),
    ):
        text = read(raw, region, path)
        assert text is not None, path
        assert "/dev/sda" not in text, path
        assert uuid_root in text and uuid_resume in text, path
    grubenv = read(raw, boot, "/grub2/grubenv")
    assert grubenv is not None and len(grubenv.encode()) == 1024
    assert not guestdisks.exists(raw, boot, "/grub2/device.map")

    # VMware tools gone; the unrelated service and its link stay.
    for path in (
        "/usr/bin/vmtoolsd",
        "/usr/bin/VGAuthService",
        "/etc/vmware-tools",
        "/usr/lib/systemd/system/vmtoolsd.service",
        "/usr/lib/systemd/system/vgauthd.service",
        "/etc/systemd/system/multi-user.target.wants/vmtoolsd.service",
        "/etc/systemd/system/vmtoolsd.service.requires",
    ):
        assert not guestdisks.exists(raw, root, path), path
    for path in (
        "/etc/systemd/system/multi-user.target.wants/sshd.service",
        "/usr/lib/systemd/system/sshd.service",
        "/usr/bin/bash",
        "/usr/share/licenses/open-vm-tools/COPYING",
    ):
        assert guestdisks.exists(raw, root, path), path

    # Network: MAC pinning gone, the rest of each file kept.
    ifcfg = read(raw, root, "/etc/sysconfig/network-scripts/ifcfg-ens192")
    assert ifcfg is not None and "HWADDR" not in ifcfg and "DEVICE=ens192" in ifcfg
    keyfile = "/etc/NetworkManager/system-connections/ens192.nmconnection"
    nm = read(raw, root, keyfile)
    assert nm is not None and "mac-address" not in nm and "[ethernet]" in nm
    assert "Mode:  0600" in guestdisks.debugfs(raw, root, f"stat {keyfile}")
    assert not guestdisks.exists(raw, root, "/etc/udev/rules.d/70-persistent-net.rules")
    assert guestdisks.exists(raw, root, "/etc/udev/rules.d/60-local-disk.rules")

    # initramfs: a dracut drop-in, labelled like its directory.
    conf = read(raw, root, "/etc/dracut.conf.d/h2k-virtio.conf")
    assert conf is not None
    assert 'add_drivers+=" virtio_blk virtio_scsi virtio_net virtio_pci "' in conf
    labels = guestdisks.debugfs(raw, root, "ea_list /etc/dracut.conf.d/h2k-virtio.conf")
    assert "etc_t" in labels

    # Nothing outside the root and /boot filesystems changed; both are clean.
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert changed and guestdisks.inside(changed, [root, boot])
    for region in (root, boot):
        run("e2fsck", "-fn", raw + region.debugfs_target)
    compared = guestdisks.qemu_img_compare(image, "vmdk", output["path"], "qcow2")
    assert compared.status == 1, compared.message
    first = compared.first_difference
    assert first is not None
    assert any(r.offset <= first < r.end for r in (root, boot)), compared.message


def test_fstab_alone_changes_only_the_root_filesystem(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["rhel"]
    image = env.copy(guest)

    result, _ = fix(env, image, fixes=["fstab"])

    assert list(result["fixes"]) == ["fstab"]
    assert result["files_changed"] == ["/etc/fstab"]
    raw = overlay_raw(env, result)
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert changed and guestdisks.inside(changed, [guest.root])
    boot_cfg = read(raw, guest.boot, "/grub2/grub.cfg")
    assert boot_cfg is not None and "root=/dev/sda2" in boot_cfg
    compared = guestdisks.qemu_img_compare(
        image, "vmdk", result["output"]["path"], "qcow2"
    )
    assert compared.status == 1
    first = compared.first_difference
    assert first is not None and guest.root.offset <= first < guest.root.end


def test_all_fixes_on_an_ubuntu_guest(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["debian"]
    image = env.copy(guest)

    result, _ = fix(env, image)

    raw = overlay_raw(env, result)
    root = guestdisks.partition_regions(raw)[2]
    assert root == guest.root
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert guestdisks.inside(changed, [root])

    fstab = read(raw, root, "/etc/fstab")
    assert fstab is not None
    assert f"UUID={guest.root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n" in fstab
    assert f"UUID={guest.swap_uuid}\tnone\tswap\tsw\t0\t0\n" in fstab
    assert "/dev/sr0        /media/cdrom0" in fstab  # not a partition: kept
    replaced = result["fixes"]["fstab"]["found"]["replaced"]
    assert [r["before"] for r in replaced] == ["/dev/sda2", "/dev/sda3"]
    grub = read(raw, root, "/boot/grub/grub.cfg")
    assert grub is not None and f"root=UUID={guest.root_uuid} ro" in grub
    assert not guestdisks.exists(raw, root, "/boot/grub/device.map")

    # Network: every pinning style, each file still valid for its tool.
    interfaces = read(raw, root, "/etc/network/interfaces")
    assert interfaces is not None and "hwaddress" not in interfaces
    assert "iface ens160 inet dhcp" in interfaces
    network_file = read(raw, root, "/etc/systemd/network/10-ens160.network")
    assert network_file == "[Match]\nName=e*\n\n[Network]\nDHCP=yes\n"
    assert not guestdisks.exists(raw, root, "/etc/systemd/network/10-ens160.link")
    lan = read(raw, root, "/etc/systemd/network/20-lan.network")
    assert lan == read(guest.raw, root, "/etc/systemd/network/20-lan.network")
    assert not guestdisks.exists(raw, root, "/etc/udev/rules.d/70-persistent-net.rules")

    installer = read(raw, root, "/etc/netplan/00-installer-config.yaml")
    storage = read(raw, root, "/etc/netplan/50-storage.yaml")
    assert installer is not None and storage is not None
    assert installer.startswith("# This is the network config written by")
    assert "macaddress" not in installer + storage
    if guestdisks.system_yaml_available():
        assert guestdisks.system_yaml(installer) == {
            "network": {
                "ethernets": {
                    "ens160": {
                        "match": {"name": "e*"},
                        "set-name": "ens160",
                        "dhcp4": True,
                        "nameservers": {"addresses": ["192.0.2.53"]},
                    }
                },
                "version": 2,
            }
        }
        assert guestdisks.system_yaml(storage) == {
            "network": {
                "version": 2,
                "ethernets": {
                    "storage0": {
                        "match": {"driver": "vmxnet3"},
                        "addresses": ["198.51.100.10/24"],
                    },
                    "storage1": {"addresses": ["198.51.100.11/24"]},
                },
            }
        }

    # VMware tools (dpkg) gone, cron untouched, the package record reported.
    for path in (
        "/usr/bin/vmtoolsd",
        "/lib/systemd/system/open-vm-tools.service",
        "/etc/systemd/system/vmtoolsd.service",
        "/etc/systemd/system/multi-user.target.wants/open-vm-tools.service",
        "/etc/systemd/system/open-vm-tools.service.requires",
    ):
        assert not guestdisks.exists(raw, root, path), path
    assert guestdisks.exists(
        raw, root, "/etc/systemd/system/multi-user.target.wants/cron.service"
    )
    assert any("dpkg" in n for n in result["fixes"]["vmware_tools"]["notes"])

    modules = read(raw, root, "/etc/initramfs-tools/modules")
    assert modules is not None
    assert modules.startswith(read(guest.raw, root, "/etc/initramfs-tools/modules"))
    assert modules.splitlines()[-4:] == [
        "virtio_blk",
        "virtio_scsi",
        "virtio_net",
        "virtio_pci",
    ]
    run("e2fsck", "-fn", raw + root.debugfs_target)


def test_dry_run_reports_the_changes_and_writes_nothing(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["rhel"])
    before = sha256(image)

    result, recorder = fix(env, image, dry_run=True)

    assert sha256(image) == before
    assert env.files() == [os.path.basename(image)]  # no overlay
    assert "applying" not in recorder.phases
    assert result["output"] == {"dry_run": True, "path": None, "source_modified": False}
    assert not result["applied"] and result["dry_run"]
    assert {f["status"] for f in result["fixes"].values()} == {"would_change"}
    (change,) = result["fixes"]["fstab"]["changes"]
    assert change["path"] == "/etc/fstab" and change["action"] == "modify"
    assert "/dev/sda2   /" in change["before"]
    assert f"UUID={disks['rhel'].root_uuid}   /" in change["after"]
    assert any(line.startswith("+UUID=") for line in change["diff"])
    created = result["fixes"]["initramfs_config"]["changes"][0]
    assert (created["action"], created["before"]) == ("create", None)
    removed = {c["path"]: c for c in result["fixes"]["vmware_tools"]["changes"]}
    link = removed["/etc/systemd/system/multi-user.target.wants/vmtoolsd.service"]
    assert link["kind"] == "symlink"
    assert link["detail"] == "-> /usr/lib/systemd/system/vmtoolsd.service"


def test_in_place_changes_the_image_itself(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["rhel"]
    image = env.copy(guest)
    before = sha256(image)

    result, _ = fix(env, image, in_place=True, fixes=["fstab", "network"])

    assert sha256(image) != before
    assert result["output"]["in_place"] and result["output"]["path"] == image
    assert env.files() == [os.path.basename(image)]
    raw = guestdisks.to_raw(image, "vmdk", env.root)
    fstab = read(raw, guest.root, "/etc/fstab")
    assert fstab is not None and f"UUID={guest.root_uuid}" in fstab
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert guestdisks.inside(changed, [guest.root])
    os.unlink(raw)

    # Fixed once, nothing is left to fix.
    again, _ = fix(env, image, dry_run=True, fixes=["fstab", "network"])
    assert {f["status"] for f in again["fixes"].values()} == {"unchanged"}


def test_lvm_root_gets_its_fstab_fixed(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["lvm"]
    image = env.copy(guest)

    result, _ = fix(env, image, fixes=["fstab"])

    assert result["guest"]["root"]["logical_volume"] == "rl/root"
    raw = overlay_raw(env, result)
    fstab = read(raw, guest.root, "/etc/fstab")
    assert fstab is not None
    assert f"UUID={guest.boot_uuid}   /boot" in fstab
    assert "/dev/mapper/rl-root   /" in fstab  # stable under KVM: kept
    assert "/dev/mapper/rl-swap   none" in fstab
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert changed and guestdisks.inside(changed, [guest.root])


def test_inspect_and_dry_run_agree(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["debian"])
    ctx, _ = env.context("inspect", image)
    inspected = inspect.run(ctx)
    planned, _ = fix(env, image, dry_run=True)

    needed = {
        c["fix"]: c["files"]
        for c in inspected["changes_needed"]
        if c["operation"] == "offline_fix"
    }
    would = {
        name: f["files_changed"]
        for name, f in planned["fixes"].items()
        if f["files_changed"]
    }
    assert needed == would


def test_disk_without_an_operating_system(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["empty"])
    before = sha256(image)
    with pytest.raises(OperationError) as caught:
        fix(env, image)
    assert caught.value.code == codes.NO_OPERATING_SYSTEM
    assert caught.value.phase == "discovery"
    assert sha256(image) == before
    assert env.files() == [os.path.basename(image)]  # the overlay was dropped


def test_a_windows_disk_is_not_a_linux_guest() -> None:
    facts = DiskFacts(
        table=None,
        filesystems=[],
        physical_volumes=[],
        logical_volumes=[],
        devices=DeviceIndex([], [], []),
        search=RootSearch(family=WINDOWS),
    )
    with pytest.raises(OperationError) as caught:
        require_linux(facts, "discovery")
    assert caught.value.code == codes.UNSUPPORTED_GUEST


def test_unknown_fix_is_refused(env: guestdisks.OpsEnv, disks: dict[str, Any]) -> None:
    image = env.copy(disks["empty"])
    with pytest.raises(OperationError) as caught:
        fix(env, image, fixes=["fstab", "registry"])
    assert caught.value.code == codes.INVALID_PARAMETERS


@pytest.mark.parametrize("after_phase", [None, "applying"])
def test_cancellation_leaves_nothing_behind(
    env: guestdisks.OpsEnv, disks: dict[str, Any], after_phase: str | None
) -> None:
    """Cancelled after the first event, or while fixes are being written."""
    image = env.copy(disks["rhel"])
    before = sha256(image)
    stop = StopAfter(after_phase)

    with pytest.raises(OperationError) as caught:
        fix(env, image, recorder=stop.recorder, should_stop=stop)
    assert caught.value.code == codes.CANCELLED
    assert sha256(image) == before
    assert env.leftovers().empty
    assert env.files() == [os.path.basename(image)]  # no overlay, no .part
    with open("/proc/mounts", encoding="utf-8") as f:
        assert env.root not in f.read()


def test_guest_symlinks_never_lead_to_the_host(tmp_path: Any) -> None:
    """An absolute or ``..``-laden link in a guest names a guest file."""
    root = tmp_path / "guest"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "real-fstab").write_text("/dev/sda1 / ext4 defaults 0 1\n")
    (root / "etc" / "fstab").symlink_to("/etc/real-fstab")
    (root / "etc" / "escape").symlink_to("../../../../../../../etc/passwd")
    tree = GuestTree({"/": (str(root), True)})

    assert tree.read_text("/etc/fstab") == "/dev/sda1 / ext4 defaults 0 1\n"
    assert tree.resolve("/etc/escape") == str(root / "etc" / "passwd")
    assert tree.read_text("/etc/escape") is None  # not the host's /etc/passwd
    tree.write_text("/etc/escape", "guest\n")
    assert (root / "etc" / "passwd").read_text() == "guest\n"
    tree.write_text("/etc/fstab", "UUID=x / ext4 defaults 0 1\n")
    assert (root / "etc" / "fstab").is_symlink()
    assert (root / "etc" / "real-fstab").read_text() == "UUID=x / ext4 defaults 0 1\n"
