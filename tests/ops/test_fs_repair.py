"""fs_repair against real damaged guest disks, checked with e2fsck and xfs_repair.

The disks (tests/repairdisks.py) hold ext4 damaged with debugfs on a
partition and on a linear LVM logical volume, XFS clean, damaged with
xfs_db and with a log left to replay, swap, and an ext4 whose features
e2fsck does not know. After each run the overlay (or the image) is read
back with qemu-img into a raw file and its filesystems checked with
``e2fsck -f -n`` and ``xfs_repair -n`` at the offsets sfdisk reports;
the source's sha256 proves it was not written.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from h2k.errors import OperationError
from h2k.operations import codes, fs_repair
from h2k.repair import fsck
from tests import repairdisks
from tests.guest.builders import sha256
from tests.recording import Recorder, StopAfter
from tests.repairdisks import Disk, Workspace

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"
)

OPERATION = "fs_repair"


@pytest.fixture(scope="module")
def fs_disk(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return repairdisks.fs_disk(str(tmp_path_factory.mktemp("fsdisk")))


@pytest.fixture(scope="module")
def xfs_disk(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return repairdisks.xfs_disk(str(tmp_path_factory.mktemp("xfsdisk")))


@pytest.fixture(scope="module")
def unrepairable_disk(tmp_path_factory: pytest.TempPathFactory) -> Disk:
    return repairdisks.unrepairable_disk(str(tmp_path_factory.mktemp("unrepairable")))


def by_volume(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["volume"]: entry for entry in result["filesystems"]}


@needs_root
def test_repairs_partition_and_logical_volume_into_an_overlay(
    space: Workspace, fs_disk: Disk
) -> None:
    disk = space.add(fs_disk)
    before = sha256(disk.image)
    recorder = Recorder()

    result = space.run(fs_repair.run, OPERATION, disk, recorder=recorder)

    found = by_volume(result)
    assert list(found) == [
        "partition 1",
        "partition 2",
        "partition 3",
        "partition 4",
        "lvm vgfs/root",
        "lvm vgfs/split",
    ]
    broken = found["partition 1"]
    assert (broken["type"], broken["label"], broken["uuid"]) == (
        "ext4",
        "broken",
        repairdisks.BROKEN_UUID,
    )
    assert (broken["state_before"], broken["state_after"]) == ("errors", "clean")
    assert broken["actions"] == ["checked", "repaired"]
    assert (broken["tool"], broken["exit_code"], broken["partition"]) == (
        "e2fsck",
        1,
        1,
    )
    assert [r["exit_code"] for r in broken["runs"]] == [1, 0]
    assert any("ref count is 3, should be 1" in line for line in broken["summary"])

    xfs = found["partition 2"]
    assert (xfs["type"], xfs["state_before"], xfs["state_after"]) == (
        "xfs",
        "clean",
        "clean",
    )
    assert (xfs["tool"], xfs["exit_code"], xfs["actions"]) == (
        "xfs_repair",
        0,
        ["checked"],
    )

    swap = found["partition 3"]
    assert (swap["type"], swap["actions"], swap["state_after"]) == (
        "swap",
        ["skipped"],
        "not_checked",
    )
    assert "swap" in swap["reason"]
    assert found["partition 4"]["type"] == "LVM2_member"
    assert found["partition 4"]["actions"] == ["skipped"]

    lv = found["lvm vgfs/root"]
    assert lv["logical_volume"] == "vgfs/root"
    assert lv["offset_bytes"] == disk.offsets["lvm vgfs/root"]
    assert (lv["label"], lv["state_before"], lv["state_after"]) == (
        "lvbroken",
        "errors",
        "clean",
    )
    assert "repaired" in lv["actions"]
    split = found["lvm vgfs/split"]
    assert split["actions"] == ["skipped"]
    assert "do not follow each other" in split["reason"]
    assert result["counts"]["repaired"] == 2
    assert result["counts"]["skipped"] == 3

    # One event per volume, the percentage counting volumes, then 100.
    percentages = [e["percentage"] for e in recorder.of("repair")]
    assert percentages == [0, 16, 33, 50, 66, 83, 100]
    assert recorder.events[-1]["phase"] == "finalize"

    # The source was not written; the overlay holds the repairs.
    output = result["output"]
    assert output["source_modified"] is False
    assert output["backing_file"] == disk.image
    assert sha256(disk.image) == before
    assert space.files() == sorted(["fs.vmdk", "fs.fs_repair.qcow2"])
    raw = repairdisks.raw_copy(output["path"], "qcow2", str(space.base))
    parts = repairdisks.partitions(raw)
    assert parts[1] == (broken["offset_bytes"], broken["size_bytes"])
    assert repairdisks.e2fsck_status(raw, *parts[1]) == 0
    assert repairdisks.xfs_status(raw, *parts[2]) == 0
    assert repairdisks.e2fsck_status(raw, lv["offset_bytes"], 8 * repairdisks.MiB) == 0
    source_raw = repairdisks.raw_copy(disk.image, disk.fmt, str(space.base))
    assert repairdisks.e2fsck_status(source_raw, *parts[1]) == 4


@needs_root
def test_dry_run_reports_and_changes_nothing(space: Workspace, fs_disk: Disk) -> None:
    disk = space.add(fs_disk)
    before = sha256(disk.image)

    result = space.run(fs_repair.run, OPERATION, disk, dry_run=True)

    assert result["dry_run"] is True
    assert result["output"] == {"dry_run": True, "path": None, "source_modified": False}
    found = by_volume(result)
    for name in ("partition 1", "lvm vgfs/root"):
        entry = found[name]
        assert (entry["state_before"], entry["state_after"]) == ("errors", "errors")
        assert entry["actions"] == ["checked", "would_repair"]
        assert entry["exit_code"] == 4
        assert [r["command"].split()[:3] for r in entry["runs"]] == [
            ["e2fsck", "-f", "-n"]
        ]
    assert found["partition 2"]["state_after"] == "clean"
    assert result["counts"]["needing_repair"] == 2
    assert sha256(disk.image) == before
    assert space.files() == ["fs.vmdk"]


@needs_root
def test_only_the_named_filesystems_are_checked(
    space: Workspace, fs_disk: Disk
) -> None:
    disk = space.add(fs_disk)

    result = space.run(
        fs_repair.run,
        OPERATION,
        disk,
        filesystems=["lvbroken", repairdisks.XFS_CLEAN_UUID.upper()],
    )

    assert [e["volume"] for e in result["filesystems"]] == [
        "partition 2",
        "lvm vgfs/root",
    ]
    raw = repairdisks.raw_copy(result["output"]["path"], "qcow2", str(space.base))
    parts = repairdisks.partitions(raw)
    # The partition not named was left as it was, damaged.
    assert repairdisks.e2fsck_status(raw, *parts[1]) == 4
    lv_offset = disk.offsets["lvm vgfs/root"]
    assert repairdisks.e2fsck_status(raw, lv_offset, 8 * repairdisks.MiB) == 0


@needs_root
def test_an_unknown_name_is_refused_by_name(space: Workspace, fs_disk: Disk) -> None:
    disk = space.add(fs_disk)

    with pytest.raises(OperationError) as caught:
        space.run(fs_repair.run, OPERATION, disk, filesystems=["broken", "nope"])

    error = caught.value
    assert error.code == codes.INVALID_PARAMETERS
    assert "'nope'" in error.message and "'broken'" not in error.message
    assert error.details["fields"]["parameters.filesystems"]
    assert space.files() == ["fs.vmdk"]


@needs_root
def test_xfs_log_is_replayed_and_damage_repaired(
    space: Workspace, xfs_disk: Disk
) -> None:
    disk = space.add(xfs_disk)
    before = sha256(disk.image)

    result = space.run(fs_repair.run, OPERATION, disk)

    dirty, damaged = result["filesystems"]
    assert (dirty["label"], dirty["state_before"], dirty["state_after"]) == (
        "dirty",
        "log_dirty",
        "clean",
    )
    assert dirty["actions"] == ["checked", "replayed_log"]
    assert not any("-L" in r["command"].split() for r in dirty["runs"])
    assert (damaged["label"], damaged["state_before"], damaged["state_after"]) == (
        "damaged",
        "errors",
        "clean",
    )
    assert damaged["actions"] == ["checked", "repaired"]
    assert [r["exit_code"] for r in damaged["runs"]] == [1, 0, 0]
    assert any("nlinks from 7 to 2" in line for line in damaged["summary"])
    assert sha256(disk.image) == before

    raw = repairdisks.raw_copy(result["output"]["path"], "qcow2", str(space.base))
    parts = repairdisks.partitions(raw)
    assert repairdisks.xfs_status(raw, *parts[1]) == 0
    assert repairdisks.xfs_status(raw, *parts[2]) == 0


@needs_root
def test_dry_run_on_xfs_says_what_it_would_do(space: Workspace, xfs_disk: Disk) -> None:
    disk = space.add(xfs_disk)

    result = space.run(fs_repair.run, OPERATION, disk, dry_run=True)

    dirty, damaged = result["filesystems"]
    assert dirty["actions"] == ["checked", "would_replay_log"]
    assert damaged["actions"] == ["checked", "would_repair"]
    assert space.files() == ["xfs.qcow2"]


@needs_root
def test_unrepairable_filesystem_fails_after_checking_the_others(
    space: Workspace, unrepairable_disk: Disk
) -> None:
    disk = space.add(unrepairable_disk)
    before = sha256(disk.image)

    with pytest.raises(OperationError) as caught:
        space.run(fs_repair.run, OPERATION, disk)

    error = caught.value
    assert (error.phase, error.code) == ("repair", codes.FILESYSTEM_UNREPAIRABLE)
    assert "FEATURE_I31" in error.message
    future, fixable = error.details["filesystems"]
    assert (future["label"], future["state_after"], future["exit_code"]) == (
        "future",
        "check_failed",
        8,
    )
    assert (fixable["label"], fixable["state_after"]) == ("fixable", "clean")
    # The job failed: no overlay is kept, the source is as it was.
    assert space.files() == ["unrepairable.vhdx"]
    assert sha256(disk.image) == before


@needs_root
def test_dry_run_fails_only_where_no_checker_can_run(
    space: Workspace, unrepairable_disk: Disk
) -> None:
    disk = space.add(unrepairable_disk)

    with pytest.raises(OperationError) as caught:
        space.run(fs_repair.run, OPERATION, disk, dry_run=True)
    assert caught.value.code == codes.FILESYSTEM_UNREPAIRABLE
    assert [f["state_after"] for f in caught.value.details["filesystems"]] == [
        "check_failed",
        "errors",
    ]

    result = space.run(
        fs_repair.run, OPERATION, disk, dry_run=True, filesystems=["fixable"]
    )
    assert [f["actions"] for f in result["filesystems"]] == [
        ["checked", "would_repair"]
    ]


@needs_root
def test_in_place_repairs_the_image_itself(space: Workspace, fs_disk: Disk) -> None:
    disk = space.add(fs_disk)
    before = sha256(disk.image)

    result = space.run(
        fs_repair.run, OPERATION, disk, in_place=True, filesystems=["broken"]
    )

    assert result["output"]["in_place"] is True
    assert result["output"]["path"] == disk.image
    assert sha256(disk.image) != before
    raw = repairdisks.raw_copy(disk.image, disk.fmt, str(space.base))
    parts = repairdisks.partitions(raw)
    assert repairdisks.e2fsck_status(raw, *parts[1]) == 0
    assert space.files() == ["fs.vmdk"]


@needs_root
@pytest.mark.parametrize("phase", [None, "repair"], ids=["at-start", "midway"])
def test_cancel_stops_and_leaves_nothing(
    space: Workspace, fs_disk: Disk, phase: str | None
) -> None:
    disk = space.add(fs_disk)
    before = sha256(disk.image)
    stop = StopAfter(phase)

    with pytest.raises(OperationError) as caught:
        space.run(
            fs_repair.run,
            OPERATION,
            disk,
            recorder=stop.recorder,
            should_stop=stop,
        )

    assert caught.value.code == codes.CANCELLED
    if phase == "repair":
        assert len(stop.recorder.of("repair")) == 1
    assert space.files() == ["fs.vmdk"]
    assert sha256(disk.image) == before


@needs_root
def test_unreadable_lvm_metadata_is_named_not_hidden(
    space: Workspace, tmp_path_factory: pytest.TempPathFactory
) -> None:
    built = repairdisks.lvm_disk(str(tmp_path_factory.mktemp("lvmheader")), "header")
    disk = space.add(built)

    result = space.run(fs_repair.run, OPERATION, disk, dry_run=True)

    (pv,) = result["filesystems"]
    assert pv["type"] == "LVM2_member"
    assert pv["actions"] == ["skipped"]
    assert "run lvm_repair first" in pv["reason"]


# What the checkers' answers mean; no disk needed.


@pytest.mark.parametrize(
    ("code", "state"),
    [
        (0, fsck.CLEAN),
        (1, fsck.CORRECTED),
        (2, fsck.CORRECTED),
        (3, fsck.CORRECTED),
        (4, fsck.ERRORS),
        (5, fsck.ERRORS),
        (8, fsck.FAILED),
        (12, fsck.FAILED),
        (32, fsck.FAILED),
        (128, fsck.FAILED),
    ],
)
def test_e2fsck_status_bits(code: int, state: str) -> None:
    assert fsck.e2fsck_meaning(code)[0] == state


def test_e2fsck_meaning_names_every_bit() -> None:
    assert fsck.e2fsck_meaning(5)[1] == "errors corrected; errors left uncorrected"


@pytest.mark.parametrize(
    ("code", "output", "repair", "state"),
    [
        (0, "Phase 7 - verify link counts...", False, fsck.CLEAN),
        (1, "would have reset inode 128 nlinks", False, fsck.ERRORS),
        (0, "resetting inode 128 nlinks from 7 to 2", True, fsck.CORRECTED),
        (
            1,
            "ALERT: ... valuable metadata changes in a log which is",
            False,
            fsck.LOG_DIRTY,
        ),
        (
            2,
            "ERROR: ... valuable metadata changes in a log which needs",
            True,
            fsck.LOG_DIRTY,
        ),
        (
            1,
            "Only one AG detected - cannot validate filesystem geometry.",
            False,
            fsck.FAILED,
        ),
        (1, "fatal error -- couldn't initialize XFS library", True, fsck.FAILED),
    ],
)
def test_xfs_repair_answers(code: int, output: str, repair: bool, state: str) -> None:
    assert fsck.xfs_meaning(code, output, repair=repair)[0] == state


def test_summary_keeps_the_findings_and_caps_their_number() -> None:
    text = "e2fsck 1.47.0 (5-Feb-2023)\nPass 1: Checking inodes\n" + "\n".join(
        f"problem {n}" for n in range(100)
    )
    lines = fsck.summary_lines(text, re.compile(r"^(Pass \d|e2fsck \d)"))
    assert lines[0] == "problem 0"
    assert len(lines) == fsck.MAX_LINES
    assert lines[-1] == "... 61 more lines"
