"""Capability detection, run for real on this host."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time

import pytest

from h2k.capabilities import LVM_TOOLS, MOUNT_OPERATIONS, NBD_ACCESS, ORDER, QEMU_IMG
from h2k.detect import available, detect_capabilities, main
from tests.guest.conftest import needs_root
from tests.guest.leaks import leftovers

pytestmark = needs_root

# The tools detection runs; a PATH made of these alone, minus one, shows
# what each capability really depends on.
DETECTION_TOOLS = (
    "qemu-img",
    "qemu-nbd",
    "nbdinfo",
    "nbdcopy",
    "nbdfuse",
    "mkfs.ext4",
    "mount",
    "umount",
    "losetup",
    "fusermount3",
    "pvs",
    "pvcreate",
    "vgcreate",
    "lvcreate",
    "vgs",
    "lvs",
    "pvck",
)


def test_every_capability_works_here(tmp_path) -> None:
    mapper_existed = os.path.exists("/dev/mapper/control")
    started = time.monotonic()
    reports = detect_capabilities(workdir=str(tmp_path))
    elapsed = time.monotonic() - started

    assert list(reports) == list(ORDER)
    for name in (QEMU_IMG, NBD_ACCESS, MOUNT_OPERATIONS):
        assert reports[name].available, reports[name]
        assert reports[name].name == name
    assert (reports[QEMU_IMG].version or "").startswith("qemu-img ")
    nbd_version = reports[NBD_ACCESS].version or ""
    assert "qemu-nbd " in nbd_version and "libnbd " in nbd_version
    assert "nbdfuse " in nbd_version
    assert "util-linux " in (reports[MOUNT_OPERATIONS].version or "")
    # This host has no device-mapper, and the LVM tools still create and read
    # metadata on a loop device: lvm_tools is honestly available here.
    assert reports[LVM_TOOLS].available, reports[LVM_TOOLS]
    assert (reports[LVM_TOOLS].version or "").startswith("lvm 2.")
    assert "device-mapper" in reports[LVM_TOOLS].detail
    assert available(reports) == list(ORDER)

    assert elapsed < 15
    assert os.listdir(tmp_path) == []
    assert leftovers(str(tmp_path)).empty
    # Detection must not leave the device-mapper node LVM creates on a whim.
    assert os.path.exists("/dev/mapper/control") == mapper_existed


def _path_without(tmp_path, missing: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in DETECTION_TOOLS:
        if tool == missing:
            continue
        found = shutil.which(tool)
        assert found, f"{tool} is not installed"
        os.symlink(found, bin_dir / tool)
    return str(bin_dir)


def test_a_missing_tool_fails_its_capability_and_those_built_on_it(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", _path_without(tmp_path, "nbdcopy"))
    work = tmp_path / "work"
    work.mkdir()
    reports = detect_capabilities(workdir=str(work))

    assert reports[QEMU_IMG].available
    assert not reports[NBD_ACCESS].available
    assert "nbdcopy" in reports[NBD_ACCESS].detail
    assert reports[NBD_ACCESS].version is None
    assert not reports[MOUNT_OPERATIONS].available
    assert "nbd_access" in reports[MOUNT_OPERATIONS].detail
    assert reports[LVM_TOOLS].available
    assert available(reports) == [QEMU_IMG, LVM_TOOLS]
    # qemu-nbd was running when nbdcopy was missed; it is gone now.
    assert os.listdir(work) == []
    assert leftovers(str(work)).empty


def test_main_prints_the_reports_as_json(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--workdir", str(tmp_path)]) == 0
    output = json.loads(capsys.readouterr().out)
    assert list(output["capabilities"]) == list(ORDER)
    assert output["available"] == list(ORDER)
    assert output["capabilities"][QEMU_IMG]["available"] is True


def test_a_work_directory_too_deep_for_a_socket_still_works(tmp_path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    reports = detect_capabilities(workdir=str(deep))
    assert available(reports) == list(ORDER)
    assert os.listdir(deep) == []


def test_an_unusable_work_directory_makes_everything_unavailable(tmp_path) -> None:
    reports = detect_capabilities(workdir=str(tmp_path / "absent"))
    assert list(reports) == list(ORDER)
    assert available(reports) == []
    assert all("scratch directory" in r.detail for r in reports.values())


def test_what_a_killed_detection_run_left_is_swept(tmp_path) -> None:
    dead = tmp_path / "h2k-detect-dead"
    dead.mkdir()
    (dead / ".owner.lock").write_text("")
    backing = dead / "pv.raw"
    backing.write_bytes(b"\0" * 2**20)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    alive = tmp_path / "h2k-detect-alive"
    alive.mkdir()
    with open(alive / ".owner.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            detect_capabilities(workdir=str(tmp_path))
            assert leftovers(str(dead)).loops == []
        finally:
            if leftovers(str(dead)).loops:
                subprocess.run(["losetup", "--detach", device], check=True)
        assert not dead.exists()
        assert alive.exists()
    assert leftovers(str(tmp_path)).empty
    assert sorted(os.listdir(tmp_path)) == ["h2k-detect-alive"]
