"""LVM inside a guest disk, found and mounted without device-mapper."""

from __future__ import annotations

import os

import pytest

from h2k.errors import OperationError
from h2k.guest import GuestDisk, LogicalVolume, Volume, codes
from tests.guest import builders
from tests.guest.builders import MiB
from tests.guest.conftest import needs_root
from tests.guest.leaks import mount_entry

pytestmark = needs_root


def _by_name(lvs: list[LogicalVolume]) -> dict[str, LogicalVolume]:
    return {lv.name: lv for lv in lvs}


def test_physical_and_logical_volumes(
    lvm_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        lvm_disk.image, lvm_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (pv,) = disk.physical_volumes()
        lvs = _by_name(disk.logical_volumes())

    assert pv.volume == Volume("partition 1", MiB, 62 * MiB)
    assert pv.vg_name == "vgguest"
    assert pv.pe_start == MiB
    assert pv.extent_size == 4 * MiB
    assert sorted(lvs) == ["pad", "root", "split"]

    root = lvs["root"]
    assert root.path == "vgguest/root"
    assert root.segtype == "linear"
    assert root.size == 12 * MiB
    assert root.volume == Volume("lvm vgguest/root", builders.LV_ROOT_OFFSET, 12 * MiB)
    assert root.reason_code is None

    assert lvs["pad"].volume == Volume(
        "lvm vgguest/pad", builders.LV_PAD_OFFSET, 4 * MiB
    )

    split = lvs["split"]
    assert split.size == 8 * MiB
    assert split.volume is None
    assert split.reason_code == codes.LVM_NOT_LINEAR


def test_filesystems_include_the_logical_volume(
    lvm_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        lvm_disk.image, lvm_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        found = {fs.volume.source: fs for fs in disk.filesystems()}

    assert sorted(found) == ["lvm vgguest/root", "partition 1"]
    assert found["partition 1"].type == "LVM2_member"
    assert found["partition 1"].usage == "raid"
    lv_fs = found["lvm vgguest/root"]
    assert (lv_fs.type, lv_fs.label, lv_fs.uuid) == (
        "ext4",
        "lvroot",
        builders.LV_ROOT_UUID,
    )


def test_linear_volume_mounts_read_only_and_the_image_is_unchanged(
    lvm_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    before = builders.sha256(lvm_disk.image)
    with GuestDisk.open(
        lvm_disk.image, lvm_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        root = _by_name(disk.logical_volumes())["root"]
        with disk.mount(root) as mountpoint:
            assert mount_entry(mountpoint)[0] == "ext4"
            with open(os.path.join(mountpoint, "etc", "os-release")) as f:
                assert f.read() == builders.OS_RELEASE
    assert builders.sha256(lvm_disk.image) == before


def test_non_contiguous_volume_is_refused(
    lvm_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        lvm_disk.image, lvm_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        split = _by_name(disk.logical_volumes())["split"]
        with pytest.raises(OperationError) as caught:
            with disk.mount(split):
                pass
    assert caught.value.code == codes.LVM_NOT_LINEAR
    assert "vgguest/split" in caught.value.message


def test_physical_volume_itself_is_not_mountable(
    lvm_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        lvm_disk.image, lvm_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        with pytest.raises(OperationError) as caught:
            with disk.mount(disk.partitions()[0]):
                pass
    assert caught.value.code == codes.UNSUPPORTED_FILESYSTEM
