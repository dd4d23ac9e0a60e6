"""Guest-disk operations through real Celery workers, checked independently."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests import guestdisks, initramfsdisks, repairdisks
from tests.e2e.conftest import wait_for, wait_terminal
from tests.guest.leaks import leftovers

pytestmark = pytest.mark.e2e


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        for chunk in iter(lambda: image.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def submit(api_url: str, operation: str, image: str, **parameters: Any) -> str:
    job_id = f"{operation}-{uuid.uuid4().hex[:6]}"
    response = requests.post(
        f"{api_url}/jobs",
        json={
            "job_id": job_id,
            "operation": operation,
            "image": {"path": image, "format": "vmdk"},
            "parameters": parameters,
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return job_id


@pytest.fixture(scope="module")
def folder(images_root: Path) -> Path:
    path = images_root / "e2e-guest"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def rocky(folder: Path) -> guestdisks.BuiltGuest:
    return guestdisks.rhel_guest(str(folder))


def assert_nothing_left(scratch: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        left = leftovers(str(scratch / "tmp"))
        if left.empty and not os.listdir(scratch / "state"):
            return
        assert time.monotonic() < deadline, (left, os.listdir(scratch / "state"))
        time.sleep(0.2)


def test_inspect_reports_the_guest_and_changes_nothing(
    api_url, worker, worker_scratch, rocky
):
    before = sha256(rocky.image)
    job_id = submit(api_url, "inspect", rocky.image)

    job = wait_terminal(api_url, job_id)

    assert job["state"] == "COMPLETED", job
    assert job["queue"] == "mount_operations"
    result = job["result"]
    assert result["os"]["distribution"] == "rocky"
    assert result["os"]["version"] == "9.3"
    fixes = {change["fix"] for change in result["changes_needed"]}
    assert {"fstab", "network", "vmware_tools"} <= fixes
    assert sha256(rocky.image) == before
    assert_nothing_left(worker_scratch)


def test_offline_fix_writes_an_overlay_and_leaves_the_source(
    api_url, worker, worker_scratch, rocky, tmp_path
):
    before = sha256(rocky.image)
    job_id = submit(api_url, "offline_fix", rocky.image, fixes=["fstab"])

    job = wait_terminal(api_url, job_id)

    assert job["state"] == "COMPLETED", job
    overlay = job["result"]["output"]["path"]
    assert overlay.endswith(".offline_fix.qcow2") and os.path.exists(overlay)
    assert sha256(rocky.image) == before
    raw = guestdisks.to_raw(overlay, "qcow2", str(tmp_path))
    fstab = guestdisks.read_file(raw, rocky.root, "/etc/fstab")
    assert fstab is not None
    assert f"UUID={guestdisks.RHEL_ROOT_UUID}" in fstab
    assert "/dev/sda2" not in fstab.split("#")[0]
    assert_nothing_left(worker_scratch)


def test_cancelled_guest_operation_leaves_nothing_behind(
    api_url, worker, worker_scratch, folder
):
    (folder / "cancel").mkdir(exist_ok=True)
    disk = initramfsdisks.debian_disk(str(folder / "cancel"), separate_boot=False)
    image = str(folder / "cancel-initramfs.vmdk")
    shutil.copyfile(disk.image, image)
    job_id = submit(api_url, "initramfs_regenerate", image)
    wait_for(
        api_url,
        job_id,
        lambda j: (j["latest_event"] or {}).get("phase") == "regeneration",
        timeout=120,
    )

    assert requests.delete(f"{api_url}/jobs/{job_id}", timeout=10).status_code == 200

    assert_nothing_left(worker_scratch)
    job = requests.get(f"{api_url}/jobs/{job_id}", timeout=10).json()
    assert job["state"] == "CANCELLED"
    assert not [p for p in folder.iterdir() if ".part" in p.name]
    assert not Path(image).with_suffix(".initramfs_regenerate.qcow2").exists()


def test_fs_repair_repairs_a_damaged_ext4_in_an_overlay(
    api_url, worker, worker_scratch, folder, tmp_path
):
    (folder / "fs").mkdir(exist_ok=True)
    disk = repairdisks.fs_disk(str(folder / "fs"))
    before = sha256(disk.image)
    job_id = submit(api_url, "fs_repair", disk.image, filesystems=["broken"])

    job = wait_terminal(api_url, job_id)

    assert job["state"] == "COMPLETED", job
    repaired = job["result"]["filesystems"]
    broken = next(fs for fs in repaired if fs["label"] == "broken")
    assert broken["state_before"] == "errors"
    assert broken["state_after"] == "clean"
    assert sha256(disk.image) == before
    overlay = job["result"]["output"]["path"]
    raw = repairdisks.raw_copy(overlay, "qcow2", str(tmp_path))
    source_raw = repairdisks.raw_copy(disk.image, "vmdk", str(tmp_path))
    start, size = repairdisks.partitions(raw)[1]
    assert repairdisks.e2fsck_status(raw, start, size) == 0
    assert repairdisks.e2fsck_status(source_raw, start, size) == 4
    assert_nothing_left(worker_scratch)


def test_lvm_repair_restores_damaged_metadata(api_url, worker, worker_scratch, folder):
    (folder / "lvm").mkdir(exist_ok=True)
    disk = repairdisks.lvm_disk(str(folder / "lvm"), "header")
    job_id = submit(api_url, "lvm_repair", disk.image)

    job = wait_terminal(api_url, job_id)

    assert job["state"] == "COMPLETED", job
    group = job["result"]["volume_groups"][0]
    assert group["state_after"] == "clean"
    assert group["backup"]["text"]
    assert job["queue"] == "lvm_tools"
    assert_nothing_left(worker_scratch)


def test_boot_repair_and_selinux_prep_in_place(
    api_url, worker, worker_scratch, folder, tmp_path
):
    (folder / "boot").mkdir(exist_ok=True)
    guest = guestdisks.rhel_guest(str(folder / "boot"), name="rocky-boot")

    boot = wait_terminal(
        api_url, submit(api_url, "boot_repair", guest.image, in_place=True)
    )
    selinux = wait_terminal(
        api_url, submit(api_url, "selinux_prep", guest.image, in_place=True)
    )

    assert boot["state"] == "COMPLETED", boot
    assert selinux["state"] == "COMPLETED", selinux
    assert selinux["result"]["selinux"] == "enforcing"
    assert selinux["result"]["relabel_scheduled"] is True
    raw = guestdisks.to_raw(guest.image, "vmdk", str(tmp_path))
    assert guestdisks.exists(raw, guest.root, "/.autorelabel")
    grub = guestdisks.read_file(raw, guest.root, "/etc/default/grub")
    assert grub is not None and "root=/dev/sda" not in grub
    assert_nothing_left(worker_scratch)


def test_initramfs_regenerate_adds_virtio(api_url, worker, worker_scratch, folder):
    (folder / "initramfs").mkdir(exist_ok=True)
    disk = initramfsdisks.debian_disk(str(folder / "initramfs"), separate_boot=True)
    job = wait_terminal(
        api_url, submit(api_url, "initramfs_regenerate", disk.image), timeout=300
    )

    assert job["state"] == "COMPLETED", job
    result = job["result"]
    assert result["tool"] == "update-initramfs"
    for kernel in result["kernels"]:
        assert kernel["sha256_after"] != kernel["sha256_before"]
        found = set(kernel["verification"]["modules_in_image"])
        assert {"virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci"} <= found
    assert os.path.exists(result["output"]["path"])
    assert_nothing_left(worker_scratch)


def test_timed_out_guest_operation_fails_and_leaves_nothing(
    api_url, worker, worker_scratch, folder
):
    (folder / "slow").mkdir(exist_ok=True)
    # An initramfs hook that takes far longer than the job may: the time
    # limit strikes while the guest's tool runs in its chroot.
    slow_hook = (
        '#!/bin/sh\ncase "$1" in prereqs) echo ""; exit 0;; esac\nsleep 60\n',
        0o755,
    )
    disk = initramfsdisks.debian_disk(
        str(folder / "slow"),
        separate_boot=False,
        extra_files={"/etc/initramfs-tools/hooks/zz-slow": slow_hook},
    )
    job_id = f"slow-{uuid.uuid4().hex[:6]}"
    response = requests.post(
        f"{api_url}/jobs",
        json={
            "job_id": job_id,
            "operation": "initramfs_regenerate",
            "image": {"path": disk.image, "format": "vmdk"},
            "execution_policy": {"timeout_seconds": 8},
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text

    job = wait_terminal(api_url, job_id, timeout=120)

    assert job["state"] == "FAILED"
    assert job["error"]["code"] == "TIMEOUT"
    assert job["error"]["phase"] == "regeneration"
    assert_nothing_left(worker_scratch)
    assert not [p for p in (folder / "slow").iterdir() if ".part" in p.name]
