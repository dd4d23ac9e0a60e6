"""selinux_prep on real guest disks: /.autorelabel, or an honest "no SELinux"."""

from __future__ import annotations

import os
from typing import Any

import pytest

from h2k.errors import OperationError
from h2k.operations import codes, selinux_prep
from tests import guestdisks
from tests.guest.builders import sha256
from tests.recording import Recorder

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"
)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("selinux-disks")
    return {
        "enforcing": guestdisks.rhel_guest(str(base / "enforcing")),
        "disabled": guestdisks.rhel_guest(
            str(base / "disabled"), name="disabled", selinux="disabled"
        ),
        "debian": guestdisks.debian_guest(str(base / "debian")),
        "empty": guestdisks.empty_guest(str(base / "empty")),
    }


def prep(
    env: guestdisks.OpsEnv, image: str, **kwargs: Any
) -> tuple[dict[str, Any], Recorder]:
    ctx, recorder = env.context("selinux_prep", image, **kwargs)
    return selinux_prep.run(ctx), recorder


def test_enforcing_guest_gets_a_relabel_scheduled(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    guest = disks["enforcing"]
    image = env.copy(guest)
    before = sha256(image)

    result, recorder = prep(env, image)

    assert sha256(image) == before
    assert recorder.phases[-1] == "finalize"
    assert result["selinux"] == "enforcing" and result["policy"] == "targeted"
    assert result["relabel_scheduled"] and not result["already_scheduled"]
    assert result["files_changed"] == ["/.autorelabel"]
    raw = guestdisks.to_raw(result["output"]["path"], "qcow2", env.root)
    assert guestdisks.exists(raw, guest.root, "/.autorelabel")
    assert not guestdisks.exists(guest.raw, guest.root, "/.autorelabel")
    changed = guestdisks.differing_ranges(guest.raw, raw)
    assert changed and guestdisks.inside(changed, [guest.root])


@pytest.mark.parametrize(
    ("disk", "mode"), [("debian", "absent"), ("disabled", "disabled")]
)
def test_guest_without_selinux_is_reported_and_unchanged(
    env: guestdisks.OpsEnv, disks: dict[str, Any], disk: str, mode: str
) -> None:
    image = env.copy(disks[disk])

    result, _ = prep(env, image)

    assert result["selinux"] == mode
    assert result["relabel_scheduled"] is False
    assert result["files_changed"] == [] and not result["applied"]
    # Nothing was mounted writable: the overlay reads exactly as the source.
    compared = guestdisks.qemu_img_compare(
        image, "vmdk", result["output"]["path"], "qcow2"
    )
    assert compared.status == 0, compared.message


def test_in_place_twice_schedules_once(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["enforcing"])

    first, _ = prep(env, image, in_place=True)
    changed_sha = sha256(image)
    second, _ = prep(env, image, in_place=True)

    assert first["relabel_scheduled"] and first["files_changed"] == ["/.autorelabel"]
    assert second["relabel_scheduled"] and second["already_scheduled"]
    assert second["files_changed"] == [] and not second["applied"]
    assert sha256(image) == changed_sha  # nothing mounted writable the second time


def test_dry_run_says_what_it_would_do(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["enforcing"])
    before = sha256(image)

    result, _ = prep(env, image, dry_run=True)

    assert sha256(image) == before
    assert env.files() == [os.path.basename(image)]
    assert result["relabel_scheduled"] is False and result["dry_run"]
    (change,) = result["changes"]
    assert (change["path"], change["action"]) == ("/.autorelabel", "create")


def test_disk_without_an_operating_system(
    env: guestdisks.OpsEnv, disks: dict[str, Any]
) -> None:
    image = env.copy(disks["empty"])
    with pytest.raises(OperationError) as caught:
        prep(env, image)
    assert caught.value.code == codes.NO_OPERATING_SYSTEM
    assert env.files() == [os.path.basename(image)]
