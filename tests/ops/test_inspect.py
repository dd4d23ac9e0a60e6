"""inspect on real guest disks, checked against sfdisk, blkid and the builders.

Every disk is built by tests/guestdisks.py with the standard tools; what
inspect reports is compared with what sfdisk and blkid read from the raw
file and with what the builder put in, and the image's sha256 proves that
inspecting wrote nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from h2k.errors import OperationError
from h2k.operations import codes, inspect
from tests import guestdisks
from tests.guest.builders import MiB, run, sha256
from tests.recording import Recorder, StopAfter

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"
)

PHASES = ["validation", "image", "opening", "discovery", "guest", "finalize"]


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("inspect-disks")
    return {
        "rhel": guestdisks.rhel_guest(str(base / "rhel")),
        "debian": guestdisks.debian_guest(str(base / "debian")),
        "lvm": guestdisks.lvm_guest(str(base / "lvm")),
        "empty": guestdisks.empty_guest(str(base / "empty")),
        "blank": guestdisks.blank_disk(str(base / "blank")),
    }


def inspect_image(
    env: guestdisks.OpsEnv, image: str, **kwargs: Any
) -> tuple[dict[str, Any], Recorder]:
    ctx, recorder = env.context("inspect", image, **kwargs)
    return inspect.run(ctx), recorder


def blkid(raw: str, region: guestdisks.Region) -> dict[str, str]:
    output = run(
        "blkid",
        "--probe",
        "--offset",
        str(region.offset),
        "--size",
        str(region.size),
        "-o",
        "export",
        raw,
    )
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_rocky_guest_is_described_and_left_unchanged(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["rhel"]
    image = env.copy(guest)
    before = sha256(image)
    files_before = env.files()

    result, recorder = inspect_image(env, image)

    assert sha256(image) == before
    assert env.files() == files_before  # no overlay, no temporary file
    assert recorder.phases == PHASES
    assert recorder.events[-1]["percentage"] == 100
    json.dumps(result)  # a job result must serialise

    assert result["image"]["format"] == "vmdk"
    assert result["image"]["virtual_size_bytes"] == 64 * MiB
    sfdisk = json.loads(run("sfdisk", "--json", guest.raw))["partitiontable"]
    table = result["partition_table"]
    assert table["label"] == "gpt" and table["id"] == sfdisk["id"]
    regions = guestdisks.partition_regions(guest.raw)
    assert [
        (p["number"], p["start_bytes"], p["size_bytes"]) for p in table["partitions"]
    ] == [(n, r.offset, r.size) for n, r in sorted(regions.items())]
    assert [p["type_name"] for p in table["partitions"]] == [
        "Linux filesystem",
        "Linux filesystem",
        "Linux swap",
    ]
    by_source = {fs["source"]: fs for fs in result["filesystems"]}
    for number, region in regions.items():
        expected = blkid(guest.raw, region)
        found = by_source[f"partition {number}"]
        assert (found["type"], found["uuid"]) == (expected["TYPE"], expected["UUID"])
    assert result["lvm"] == {
        "physical_volumes": [],
        "volume_groups": [],
        "logical_volumes": [],
    }

    os_facts = result["os"]
    assert os_facts["family"] == "linux"
    assert os_facts["distribution"] == "rocky"
    assert os_facts["distribution_family"] == "rhel"
    assert os_facts["version"] == "9.3"
    assert os_facts["hostname"] == "rocky-vm01"
    assert os_facts["root"]["uuid"] == guest.root_uuid
    assert os_facts["root"]["partition"] == 2
    assert os_facts["boot"]["uuid"] == guest.boot_uuid

    kernels = {k["version"]: k for k in result["kernels"]}
    kernel = kernels[guest.kernel]
    assert kernel["image"] == f"/boot/vmlinuz-{guest.kernel}"
    assert kernel["initramfs"] == f"/boot/initramfs-{guest.kernel}.img"
    assert kernel["modules"] is True  # found through the /lib -> usr/lib link
    assert kernel["virtio"]["virtio_blk"] == "module"
    assert guest.kernel in result["kernel_module_versions"]

    boot = result["bootloader"]
    assert boot["loaders"] == ["grub2"]
    assert {f["path"] for f in boot["config_files"]} >= {
        "/boot/grub2/grub.cfg",
        "/boot/grub2/grubenv",
        "/boot/grub2/device.map",
        "/etc/default/grub",
    }
    assert len(boot["bls_entries"]) == 2
    assert all("root=/dev/sda2" in e["options"] for e in boot["bls_entries"])
    assert boot["device_map"]["lines"] == ["(hd0)      /dev/sda"]
    roots = [a for a in boot["kernel_arguments"] if a["param"] == "root"]
    assert roots and all(a["device_name"] for a in roots)
    assert all(s["on_disk"] for s in boot["grub_searches"])

    entries = {e["mountpoint"]: e for e in result["fstab"]["entries"]}
    assert entries["/"]["spec"] == "/dev/sda2" and entries["/"]["device_name"]
    assert entries["/"]["resolves_to"]["uuid"] == guest.root_uuid
    assert entries["/boot"]["resolves_to"]["uuid"] == guest.boot_uuid
    assert entries["none"]["resolves_to"]["uuid"] == guest.swap_uuid
    assert not entries["/dev/shm"]["device_name"]

    network = {f["path"]: f for f in result["network"]["files"]}
    assert result["network"]["mac_pinned"]
    for path in (
        "/etc/sysconfig/network-scripts/ifcfg-ens192",
        "/etc/NetworkManager/system-connections/ens192.nmconnection",
        "/etc/udev/rules.d/70-persistent-net.rules",
    ):
        assert network[path]["mac_addresses"] == [guest.mac]

    vmware = result["vmware_tools"]
    assert vmware["present"]
    assert "/usr/bin/vmtoolsd" in vmware["evidence"]["binaries"]
    assert "/usr/lib/systemd/system/vmtoolsd.service" in vmware["evidence"]["units"]
    assert (
        "/etc/systemd/system/multi-user.target.wants/vmtoolsd.service"
        in vmware["evidence"]["enablement"]
    )

    assert result["selinux"]["mode"] == "enforcing"
    assert result["selinux"]["policy"] == "targeted"
    assert result["initramfs"]["tool"] == "dracut"
    assert result["initramfs"]["virtio"]["missing"] == [
        "virtio_blk",
        "virtio_scsi",
        "virtio_net",
        "virtio_pci",
    ]

    needed = {c["fix"]: c for c in result["changes_needed"]}
    assert set(needed) == {
        "fstab",
        "bootloader",
        "vmware_tools",
        "network",
        "initramfs_config",
        "initramfs_regenerate",
        "selinux_prep",
    }
    assert needed["fstab"]["files"] == ["/etc/fstab"]
    assert "/boot/grub2/device.map" in needed["bootloader"]["files"]
    assert needed["initramfs_config"]["files"] == ["/etc/dracut.conf.d/h2k-virtio.conf"]
    assert needed["selinux_prep"]["operation"] == "selinux_prep"


def test_ubuntu_guest_with_boot_on_the_root(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["debian"]
    image = env.copy(guest)
    before = sha256(image)

    result, _ = inspect_image(env, image)

    assert sha256(image) == before
    assert result["partition_table"]["partitions"][0]["type_name"] == "BIOS boot"
    assert result["partition_table"]["partitions"][0]["filesystem"] is None
    os_facts = result["os"]
    assert (os_facts["distribution"], os_facts["version"]) == ("ubuntu", "22.04")
    assert os_facts["codename"] == "jammy"
    assert os_facts["distribution_family"] == "debian"
    assert os_facts["boot"] is None
    assert os_facts["hostname"] == "ubuntu-vm02"
    assert [k["version"] for k in result["kernels"]] == [guest.kernel]
    assert result["kernels"][0]["initramfs"] == f"/boot/initrd.img-{guest.kernel}"

    kinds = {f["path"]: f["kind"] for f in result["network"]["files"]}
    pinned = {f["path"] for f in result["network"]["files"] if f["mac_pinned"]}
    assert kinds["/etc/netplan/00-installer-config.yaml"] == "netplan"
    assert kinds["/etc/systemd/network/10-ens160.link"] == "networkd-link"
    assert "/etc/systemd/network/20-lan.network" not in pinned
    assert "/etc/network/interfaces" in pinned
    storage = next(
        f for f in result["network"]["files"] if f["path"].endswith("50-storage.yaml")
    )
    assert storage["mac_addresses"] == ["00:50:56:9a:00:01", "00:50:56:9a:00:02"]

    sdrom = next(e for e in result["fstab"]["entries"] if e["spec"] == "/dev/sr0")
    assert sdrom["resolves_to"] is None
    assert result["selinux"]["mode"] == "absent"
    assert result["initramfs"]["tool"] == "update-initramfs"
    assert result["initramfs"]["virtio"]["modules_policy"] == "dep"
    assert result["vmware_tools"]["evidence"]["package_records"] == [
        "/var/lib/dpkg/info/open-vm-tools.list"
    ]
    fixes = [c["fix"] for c in result["changes_needed"]]
    assert "selinux_prep" not in fixes
    assert "bootloader" in fixes and "network" in fixes


def test_lvm_root_layout(env: guestdisks.OpsEnv, disks: dict[str, Any]) -> None:
    guest = disks["lvm"]
    image = env.copy(guest)
    before = sha256(image)

    result, _ = inspect_image(env, image)

    assert sha256(image) == before
    lvm = result["lvm"]
    assert [g["name"] for g in lvm["volume_groups"]] == ["rl"]
    assert lvm["volume_groups"][0]["logical_volumes"] == ["root", "swap"]
    lvs = {lv["name"]: lv for lv in lvm["logical_volumes"]}
    assert lvs["root"]["linear"] and lvs["root"]["mountable"]
    # The builder placed the root from LVM's own pe_start, not h2k's arithmetic.
    assert lvs["root"]["offset_bytes"] == guest.root.offset
    assert lvs["root"]["size_bytes"] == 32 * MiB
    assert result["os"]["root"]["logical_volume"] == "rl/root"
    assert result["os"]["root"]["uuid"] == guest.root_uuid
    assert result["os"]["boot"]["uuid"] == guest.boot_uuid
    assert blkid(guest.raw, guest.root)["UUID"] == guest.root_uuid

    entries = {e["mountpoint"]: e for e in result["fstab"]["entries"]}
    assert entries["/"]["spec_kind"] == "lvm"
    assert entries["/"]["resolves_to"]["logical_volume"] == "rl/root"
    assert entries["/boot"]["device_name"]
    needed = {c["fix"]: c for c in result["changes_needed"]}
    assert needed["fstab"]["changes"] == [f"/dev/sda1 -> UUID={guest.boot_uuid}"]
    # root=/dev/mapper/rl-root is stable: only device.map needs the bootloader fix.
    assert needed["bootloader"]["files"] == ["/boot/grub2/device.map"]


def test_disk_without_an_operating_system(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["empty"])
    before = sha256(image)

    result, recorder = inspect_image(env, image)

    assert sha256(image) == before
    assert result["os"]["family"] == "unknown"
    assert "no filesystem on the disk holds" in result["os"]["reason"]
    assert [fs["uuid"] for fs in result["filesystems"]] == [disks["empty"].root_uuid]
    assert result["filesystems_checked"][0]["found"] == "nothing"
    assert result["changes_needed"] == []
    assert result["fstab"] is None and result["kernels"] == []
    assert recorder.phases[-1] == "finalize"


def test_disk_without_any_filesystem(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["blank"])
    with pytest.raises(OperationError) as caught:
        inspect_image(env, image)
    assert caught.value.code == codes.NO_OPERATING_SYSTEM
    assert caught.value.details["partition_table"] is None


@pytest.mark.parametrize("after_phase", [None, "guest"])
def test_cancellation_leaves_nothing_behind(
    env: guestdisks.OpsEnv, disks: dict[str, Any], after_phase: str | None
) -> None:
    """Cancelled after the first event, or once the guest is mounted."""
    image = env.copy(disks["rhel"])
    before = sha256(image)
    stop = StopAfter(after_phase)

    with pytest.raises(OperationError) as caught:
        inspect_image(env, image, recorder=stop.recorder, should_stop=stop)
    assert caught.value.code == codes.CANCELLED
    assert sha256(image) == before
    assert env.leftovers().empty
    assert env.files() == [os.path.basename(image)]
