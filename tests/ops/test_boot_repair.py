"""boot_repair on real guest disks, its work read back with debugfs."""

from __future__ import annotations

import os
from typing import Any

import pytest

from h2k.errors import OperationError
from h2k.operations import boot_repair, codes
from tests import guestdisks
from tests.guest.builders import gpt_ext4_disk, sha256
from tests.recording import Recorder, StopAfter

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"
)

# UUIDs no filesystem of the disks has: what a recreated filesystem leaves.
STALE_ROOT = "0badc0de-0000-4000-8000-000000000001"
STALE_BOOT = "0badc0de-0000-4000-8000-000000000002"


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("boot-repair-disks")
    return {
        "rhel": guestdisks.rhel_guest(str(base / "rhel")),
        "stale": guestdisks.rhel_guest(
            str(base / "stale"),
            name="stale",
            root_arg=f"UUID={STALE_ROOT}",
            search_uuid=STALE_BOOT,
        ),
        "debian": guestdisks.debian_guest(str(base / "debian")),
        "no-grub": gpt_ext4_disk(str(base)),
    }


def repair(
    env: guestdisks.OpsEnv, image: str, **kwargs: Any
) -> tuple[dict[str, Any], Recorder]:
    ctx, recorder = env.context("boot_repair", image, **kwargs)
    return boot_repair.run(ctx), recorder


def test_device_names_become_uuids(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["rhel"]
    image = env.copy(guest)
    before = sha256(image)

    result, recorder = repair(env, image)

    assert sha256(image) == before
    assert recorder.phases[-1] == "finalize"
    assert result["status"] == "changed" and result["loaders"] == ["grub2"]
    assert "/boot/grub2/device.map" in result["files_changed"]
    raw = guestdisks.to_raw(result["output"]["path"], "qcow2", env.root)
    entry = f"/loader/entries/{guestdisks.MACHINE_ID}-{guest.kernel}.conf"
    bls = guestdisks.read_file(raw, guest.boot, entry)
    assert (
        bls is not None
        and (
            f"options root=UUID={guest.root_uuid} ro crashkernel=auto "
            f"resume=UUID={guest.swap_uuid} rhgb quiet\n"
        )
        in bls
    )
    default = guestdisks.read_file(raw, guest.root, "/etc/default/grub")
    assert default is not None and f"root=UUID={guest.root_uuid}" in default
    assert not guestdisks.exists(raw, guest.boot, "/grub2/device.map")
    # boot_repair leaves fstab to offline_fix.
    assert guestdisks.read_file(raw, guest.root, "/etc/fstab") == (
        guestdisks.read_file(guest.raw, guest.root, "/etc/fstab")
    )
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert changed and guestdisks.inside(changed, [guest.root, guest.boot])


def test_uuids_not_on_the_disk_are_repointed(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["stale"]
    image = env.copy(guest)

    result, _ = repair(env, image)

    raw = guestdisks.to_raw(result["output"]["path"], "qcow2", env.root)
    grub = guestdisks.read_file(raw, guest.boot, "/grub2/grub.cfg")
    assert grub is not None
    assert STALE_ROOT not in grub and STALE_BOOT not in grub
    assert f"linux /vmlinuz-{guest.kernel} root=UUID={guest.root_uuid} ro" in grub
    assert f"search --no-floppy --fs-uuid --set=root {guest.boot_uuid}\n" in grub
    assert f"--hint='hd0,gpt1'  {guest.boot_uuid}\n" in grub
    grubenv = guestdisks.read_file(raw, guest.boot, "/grub2/grubenv")
    assert grubenv is not None and f"kernelopts=root=UUID={guest.root_uuid}" in grubenv
    assert len(grubenv.encode()) == 1024
    summaries = " ".join(c["summary"] for c in result["changes"])
    assert f"root=UUID={STALE_ROOT} -> UUID={guest.root_uuid}" in summaries
    assert f"search {STALE_BOOT} -> {guest.boot_uuid}" in summaries


def test_dry_run_on_a_debian_guest(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["debian"]
    image = env.copy(guest)
    before = sha256(image)

    result, _ = repair(env, image, dry_run=True)

    assert sha256(image) == before
    assert env.files() == [os.path.basename(image)]
    assert result["status"] == "would_change" and not result["applied"]
    by_path = {c["path"]: c for c in result["changes"]}
    assert set(by_path) == {
        "/boot/grub/grub.cfg",
        "/boot/grub/device.map",
        "/etc/default/grub",
    }
    assert by_path["/boot/grub/device.map"]["action"] == "remove"
    assert by_path["/boot/grub/device.map"]["before"] == "(hd0)\t/dev/sda\n"
    default = by_path["/etc/default/grub"]
    assert (
        f'GRUB_CMDLINE_LINUX="root=UUID={guest.root_uuid} '
        f'resume=UUID={guest.swap_uuid}"' in default["after"]
    )


def test_guest_without_grub_is_no_bootloader(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["no-grub"].image)
    before = sha256(image)
    with pytest.raises(OperationError) as caught:
        repair(env, image)
    assert caught.value.code == codes.NO_BOOTLOADER
    assert caught.value.phase == "planning"
    assert sha256(image) == before
    assert env.files() == [os.path.basename(image)]  # the overlay was dropped


def test_cancellation_while_writing(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["rhel"])
    before = sha256(image)
    stop = StopAfter("applying")

    with pytest.raises(OperationError) as caught:
        repair(env, image, recorder=stop.recorder, should_stop=stop)
    assert caught.value.code == codes.CANCELLED
    assert sha256(image) == before
    assert env.leftovers().empty
    assert env.files() == [os.path.basename(image)]
