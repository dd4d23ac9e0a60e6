"""Real guest images opened: partitions, filesystems, read-only and rw mounts."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from h2k.errors import OperationError
from h2k.guest import GuestDisk, Volume, codes
from tests.guest import builders
from tests.guest.builders import MiB, loop_device, run, to_raw
from tests.guest.conftest import needs_root
from tests.guest.leaks import leftovers, mount_entry

pytestmark = needs_root


def _independent_blkid(raw: str, offset: int, size: int) -> dict[str, str]:
    """blkid on a read-only loop device over the source raw file."""
    with loop_device(raw, offset, size, read_only=True) as loop:
        output = run("blkid", "-p", "-o", "export", loop)
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_gpt_partitions_match_sfdisk_on_the_source(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    source = json.loads(run("sfdisk", "--json", gpt_disk.raw))["partitiontable"]
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        table = disk.partition_table()
        partitions = disk.partitions()
        assert disk.size == 32 * MiB
        assert os.path.getsize(disk.raw_path) == 32 * MiB

    assert table is not None
    assert table.label == "gpt"
    assert table.id == source["id"]
    assert len(partitions) == 1
    part = partitions[0]
    assert part.number == 1
    assert part.start == MiB
    assert part.size == 28 * MiB
    assert part.type == builders.LINUX_FS_GUID
    assert part.uuid == source["partitions"][0]["uuid"]
    assert part.name == "root"
    assert not part.bootable


def test_gpt_filesystem_matches_blkid_on_the_source(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    expected = _independent_blkid(gpt_disk.raw, MiB, 28 * MiB)
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (fs,) = disk.filesystems()
        assert disk.logical_volumes() == []
        assert disk.physical_volumes() == []

    assert fs.volume == Volume("partition 1", MiB, 28 * MiB)
    assert fs.type == expected["TYPE"] == "ext4"
    assert fs.label == expected["LABEL"] == "root"
    assert fs.uuid == expected["UUID"] == builders.ROOT_UUID
    assert fs.usage == "filesystem"


def test_read_only_mount_reads_the_guest_and_changes_nothing(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    before = builders.sha256(gpt_disk.image)
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (fs,) = disk.filesystems()
        with disk.mount(fs) as root:
            with open(os.path.join(root, "etc", "os-release"), encoding="utf-8") as f:
                assert f.read() == builders.OS_RELEASE
            with open(os.path.join(root, "etc", "fstab"), encoding="utf-8") as f:
                assert f.read() == builders.FSTAB
            fstype, options = mount_entry(root)
            assert fstype == "ext4"
            assert "ro" in options and "nodev" in options and "nosuid" in options
            with pytest.raises(OSError):
                open(os.path.join(root, "etc", "new"), "w").close()
        assert not os.path.exists(root)
    assert builders.sha256(gpt_disk.image) == before


def test_mounting_a_partition_directly(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (part,) = disk.partitions()
        with disk.mount(part) as root:
            assert os.path.isfile(os.path.join(root, "etc", "os-release"))


def test_writable_mount_writes_into_the_image(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str, tmp_path
) -> None:
    image = str(tmp_path / "rw.vmdk")
    shutil.copyfile(gpt_disk.image, image)
    message = "written by h2k through qemu-nbd, nbdfuse and a loop device\n"
    with GuestDisk.open(
        image, "vmdk", writable=True, workdir=workdir, state_dir=state_dir
    ) as disk:
        (fs,) = disk.filesystems()
        with disk.mount(fs, writable=True) as root:
            with open(os.path.join(root, "etc", "h2k-written"), "w") as f:
                f.write(message)

    run("qemu-img", "check", "-f", "vmdk", image)
    out = to_raw(image, "vmdk", str(tmp_path))
    partition = f"{out}?offset={MiB}"
    assert run("debugfs", "-R", "cat /etc/h2k-written", partition) == message
    # The filesystem is clean after the unmount: e2fsck finds nothing to fix.
    run("e2fsck", "-f", "-n", partition)


def test_read_only_session_refuses_a_writable_mount(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (fs,) = disk.filesystems()
        with pytest.raises(OperationError) as caught:
            with disk.mount(fs, writable=True):
                pass
        assert caught.value.code == codes.READ_ONLY


def test_mbr_xfs_vhdx(
    mbr_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    before = builders.sha256(mbr_disk.image)
    expected = _independent_blkid(mbr_disk.raw, MiB, 40 * MiB)
    disk_id = run("sfdisk", "--disk-id", mbr_disk.raw).strip()
    with GuestDisk.open(
        mbr_disk.image, mbr_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        table = disk.partition_table()
        (part,) = disk.partitions()
        (fs,) = disk.filesystems()
        with disk.mount(fs) as root:
            fstype, options = mount_entry(root)
            assert fstype == "xfs"
            assert {"ro", "norecovery"} <= set(options)
            assert os.listdir(root) == []

    assert table is not None and table.label == "dos"
    assert int(table.id or "0", 16) == int(disk_id, 16) == int(builders.MBR_DISK_ID, 16)
    assert (part.number, part.start, part.size, part.type) == (1, MiB, 40 * MiB, "83")
    assert part.bootable
    assert part.uuid == "1a2b3c4d-01"
    assert (fs.type, fs.label, fs.uuid) == ("xfs", "data", builders.XFS_UUID)
    assert (fs.type, fs.label, fs.uuid) == (
        expected["TYPE"],
        expected["LABEL"],
        expected["UUID"],
    )
    assert builders.sha256(mbr_disk.image) == before


def test_disk_without_partition_table(
    whole_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    before = builders.sha256(whole_disk.image)
    with GuestDisk.open(
        whole_disk.image, whole_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        assert disk.partition_table() is None
        with pytest.raises(OperationError) as caught:
            disk.partitions()
        assert caught.value.code == codes.NO_PARTITIONS
        (fs,) = disk.filesystems()
        assert fs.volume == Volume("disk", 0, 16 * MiB)
        assert (fs.type, fs.label, fs.uuid) == ("ext4", "whole", builders.WHOLE_UUID)
        with disk.mount(fs) as root:
            with open(os.path.join(root, "etc", "os-release"), encoding="utf-8") as f:
                assert f.read() == builders.OS_RELEASE
    assert builders.sha256(whole_disk.image) == before


def test_mounting_a_volume_without_filesystem_is_refused(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        # The gap after the partition table and before partition 1.
        with pytest.raises(OperationError) as caught:
            with disk.mount(Volume("gap", 512 * 40, 512 * 2000)):
                pass
        assert caught.value.code == codes.UNSUPPORTED_FILESYSTEM


@pytest.mark.parametrize("fmt", ["vvfat", "file", "nbd"])
def test_unsupported_format_is_refused_before_anything_starts(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str, fmt: str
) -> None:
    with pytest.raises(OperationError) as caught:
        with GuestDisk.open(gpt_disk.image, fmt, workdir=workdir, state_dir=state_dir):
            pass
    assert caught.value.code == codes.UNSUPPORTED_FORMAT
    assert os.listdir(state_dir) == []


def test_wrong_format_fails_to_open_and_leaves_nothing(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with pytest.raises(OperationError) as caught:
        with GuestDisk.open(
            gpt_disk.raw, "qcow2", workdir=workdir, state_dir=state_dir
        ):
            pass
    assert caught.value.code == codes.IMAGE_OPEN_FAILED
    assert "qcow2" in caught.value.details["stderr"]
    assert os.listdir(state_dir) == []


def test_missing_image(workdir: str, state_dir: str, tmp_path) -> None:
    with pytest.raises(OperationError) as caught:
        with GuestDisk.open(
            str(tmp_path / "absent.vmdk"), "vmdk", workdir=workdir, state_dir=state_dir
        ):
            pass
    assert caught.value.code == codes.IMAGE_OPEN_FAILED


def test_an_image_in_use_read_write_is_locked(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str, tmp_path
) -> None:
    image = str(tmp_path / "locked.vmdk")
    shutil.copyfile(gpt_disk.image, image)
    with GuestDisk.open(
        image, "vmdk", writable=True, workdir=workdir, state_dir=state_dir
    ) as first:
        with pytest.raises(OperationError) as caught:
            with GuestDisk.open(
                image, "vmdk", writable=True, workdir=workdir, state_dir=state_dir
            ):
                pass
        assert caught.value.code == codes.IMAGE_LOCKED
        assert caught.value.retryable
        # The first session is unharmed by the second one's failure.
        assert first.partitions()[0].name == "root"
        assert leftovers(first.directory).fuse_mounts


def test_unusable_state_dir_fails_before_anything_starts(
    gpt_disk: builders.BuiltDisk, workdir: str, tmp_path
) -> None:
    not_a_dir = tmp_path / "state-file"
    not_a_dir.write_text("")
    with pytest.raises(OperationError) as caught:
        with GuestDisk.open(
            gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=str(not_a_dir)
        ):
            pass
    assert caught.value.code == codes.SETUP_FAILED
