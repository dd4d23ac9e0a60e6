"""Teardown on exception and cancellation, and recovery after a crash."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from h2k.errors import OperationError, ToolCancelled
from h2k.guest import GuestDisk, cleanup_stale, codes, procinfo
from tests.guest import builders
from tests.guest.conftest import needs_root
from tests.guest.leaks import leftovers

pytestmark = needs_root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Boom(Exception):
    pass


def test_exception_inside_the_session_leaves_nothing(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with pytest.raises(Boom):
        with GuestDisk.open(
            gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
        ) as disk:
            directory = disk.directory
            (fs,) = disk.filesystems()
            with disk.mount(fs):
                during = leftovers(directory)
                assert len(during.mounts) == 1
                assert len(during.fuse_mounts) == 1
                assert len(during.loops) == 1
                assert len(during.processes) == 2  # qemu-nbd and nbdfuse
                assert len(os.listdir(state_dir)) == 2  # ledger and its lock
                raise Boom()

    after = leftovers(directory)
    assert after.empty, after
    assert not os.path.exists(directory)
    assert os.listdir(state_dir) == []


def test_cancellation_tears_everything_down(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    cancelled = [False]
    with pytest.raises(ToolCancelled):
        with GuestDisk.open(
            gpt_disk.image,
            gpt_disk.fmt,
            workdir=workdir,
            state_dir=state_dir,
            should_stop=lambda: cancelled[0],
        ) as disk:
            directory = disk.directory
            (fs,) = disk.filesystems()
            with disk.mount(fs):
                cancelled[0] = True
                disk.partitions()

    after = leftovers(directory)
    assert after.empty, after
    assert os.listdir(state_dir) == []


def test_cancelled_before_the_server_is_ready(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with pytest.raises(ToolCancelled):
        with GuestDisk.open(
            gpt_disk.image,
            gpt_disk.fmt,
            workdir=workdir,
            state_dir=state_dir,
            should_stop=lambda: True,
        ):
            pytest.fail("the session opened although it was cancelled")
    assert os.listdir(state_dir) == []


def test_deep_work_directory_puts_the_socket_elsewhere_and_cleans_it(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    deep = os.path.join(workdir, *(["d" * 40] * 3))
    os.makedirs(deep)
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=deep, state_dir=state_dir
    ) as disk:
        socket_dir = disk.nbd_uri.split("socket=", 1)[1].rsplit("/", 1)[0]
        assert not socket_dir.startswith(deep)
        assert os.path.isdir(socket_dir)
        (fs,) = disk.filesystems()
        with disk.mount(fs) as root:
            assert os.path.isfile(os.path.join(root, "etc", "os-release"))
    assert not os.path.exists(socket_dir)
    assert os.listdir(deep) == []
    shutil.rmtree(os.path.join(workdir, "d" * 40))


def test_session_survives_a_second_exit_of_its_mount(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    """Teardown of what already vanished (unmounted by hand) is not an error."""
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (fs,) = disk.filesystems()
        with disk.mount(fs) as mountpoint:
            builders.run("umount", mountpoint)
        directory = disk.directory
    assert leftovers(directory).empty
    assert os.listdir(state_dir) == []


def test_busy_mount_stops_the_teardown_and_cleanup_stale_finishes_it(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with contextlib.ExitStack() as holder:
        with pytest.raises(OperationError) as caught:
            with GuestDisk.open(
                gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
            ) as disk:
                directory, session = disk.directory, disk.session_id
                (fs,) = disk.filesystems()
                with disk.mount(fs) as root:
                    # Something still reading the guest keeps the mount busy.
                    holder.enter_context(open(os.path.join(root, "etc", "fstab")))

        assert caught.value.code == codes.TEARDOWN_FAILED
        assert caught.value.details["resource"]["kind"] == "mount"
        # Nothing beneath the busy mount was pulled away from under it.
        left = leftovers(directory)
        assert len(left.mounts) == 1
        assert len(left.fuse_mounts) == 1
        assert len(left.loops) == 1
        assert len(left.processes) == 2
        assert sorted(os.listdir(state_dir)) == [f"{session}.json", f"{session}.lock"]
        # Still busy: cleanup keeps the record for later.
        assert cleanup_stale(state_dir) == []

    assert cleanup_stale(state_dir) == [session]
    after = leftovers(directory)
    assert after.empty, after
    assert os.listdir(state_dir) == []


def _crash(disk: builders.BuiltDisk, workdir: str, state_dir: str) -> dict[str, str]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.guest.crash_session",
            disk.image,
            disk.fmt,
            workdir,
            state_dir,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == -9, result.stderr
    info: dict[str, str] = json.loads(result.stdout)
    return info


def test_cleanup_stale_tears_down_what_a_dead_worker_left(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    info = _crash(gpt_disk, workdir, state_dir)
    directory = info["directory"]
    left = leftovers(directory)
    assert len(left.mounts) == 1
    assert len(left.fuse_mounts) == 1
    assert len(left.loops) == 1
    assert len(left.processes) == 2
    assert sorted(os.listdir(state_dir)) == [
        f"{info['session']}.json",
        f"{info['session']}.lock",
    ]

    assert cleanup_stale(state_dir) == [info["session"]]

    after = leftovers(directory)
    assert after.empty, after
    assert not os.path.exists(directory)
    assert os.listdir(state_dir) == []
    # Nothing left to do the second time.
    assert cleanup_stale(state_dir) == []


def test_cleanup_stale_leaves_live_sessions_alone(
    gpt_disk: builders.BuiltDisk, workdir: str, state_dir: str
) -> None:
    with GuestDisk.open(
        gpt_disk.image, gpt_disk.fmt, workdir=workdir, state_dir=state_dir
    ) as disk:
        (fs,) = disk.filesystems()
        with disk.mount(fs) as mountpoint:
            assert cleanup_stale(state_dir) == []
            assert os.path.isfile(os.path.join(mountpoint, "etc", "os-release"))
            assert len(leftovers(disk.directory).processes) == 2


def test_cleanup_stale_spares_a_process_that_reused_a_recorded_pid(
    state_dir: str, tmp_path
) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        identity = procinfo.identify(bystander.pid)
        assert identity is not None
        ledger = {
            "version": 1,
            "session": "deadbeef",
            "resources": [
                {
                    "id": 1,
                    "kind": "dir",
                    "path": str(tmp_path / "h2k-guest-deadbeef"),
                },
                {
                    "id": 2,
                    "kind": "process",
                    "role": "qemu-nbd",
                    # The pid a dead worker's qemu-nbd had, now the sleep's.
                    "process": {
                        "pid": bystander.pid,
                        "start": identity.start,
                        "argv": ["qemu-nbd", "-f", "vmdk", "/gone.vmdk"],
                    },
                },
                {
                    "id": 3,
                    "kind": "process",
                    "role": "qemu-nbd",
                    "process": {
                        "pid": bystander.pid,
                        "start": identity.start - 1,
                        "argv": list(identity.argv),
                    },
                },
            ],
        }
        os.makedirs(tmp_path / "h2k-guest-deadbeef")
        with open(os.path.join(state_dir, "deadbeef.json"), "w") as f:
            json.dump(ledger, f)

        assert cleanup_stale(state_dir) == ["deadbeef"]

        assert bystander.poll() is None
        assert not os.path.exists(tmp_path / "h2k-guest-deadbeef")
        assert os.listdir(state_dir) == []
    finally:
        bystander.kill()
        bystander.wait()
