"""initramfs_regenerate against a real Debian guest with initramfs-tools.

The guest (tests/initramfsdisks.py) is a debootstrapped Debian with a real
kernel's virtio modules and an initramfs built without them. Every result
is checked with tools of the host, not with h2k: the output is converted
to raw with qemu-img, the partition cut out with dd, the initramfs dumped
with debugfs and listed with zstd and cpio, the filesystems checked with
e2fsck -n, and the source's sha256 compared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from h2k.errors import OperationError
from h2k.guest import cleanup_stale
from h2k.guest.chroot import guest_path
from h2k.operations import codes, initramfs_regenerate
from h2k.operations.base import OperationContext
from tests import initramfsdisks
from tests.guest import builders
from tests.guest.builders import run, to_raw
from tests.guest.leaks import assert_clean, isolate_sessions, leftovers, mounts_below
from tests.recording import Recorder

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: debootstrap, chroot, loop devices, mounts"
)

MiB = 2**20
REPO = Path(__file__).resolve().parents[2]
PHASES = ["validation", "inspection", "regeneration", "verification", "finalize"]
VIRTIO = ("virtio_blk", "virtio_scsi", "virtio_net", "virtio_pci")


@dataclass
class Place:
    """A test's allowed root, its session work dir and its ledger dir."""

    root: Path
    work: Path
    state: Path


@pytest.fixture(scope="module")
def separate_boot(
    tmp_path_factory: pytest.TempPathFactory,
) -> initramfsdisks.DebianDisk:
    directory = tmp_path_factory.mktemp("separate-boot")
    return initramfsdisks.debian_disk(str(directory), separate_boot=True)


@pytest.fixture(scope="module")
def boot_in_root(tmp_path_factory: pytest.TempPathFactory) -> initramfsdisks.DebianDisk:
    directory = tmp_path_factory.mktemp("boot-in-root")
    return initramfsdisks.debian_disk(str(directory), separate_boot=False)


def _processes_rooted_in(directory: str) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            where = os.readlink(f"/proc/{name}/root")
        except OSError:
            continue
        if where.startswith(directory.rstrip("/") + "/"):
            found.append(int(name))
    return found


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Place]:
    """Sessions go to ``work`` and ledgers to ``state``; both empty after."""
    found = Place(tmp_path / "images", tmp_path / "work", tmp_path / "state")
    for path in (found.root, found.work, found.state):
        path.mkdir()
    isolate_sessions(monkeypatch, str(found.work), str(found.state))
    yield found
    for directory in (found.work, found.root):
        assert_clean(str(directory))
    assert _processes_rooted_in(str(found.work)) == []
    assert os.listdir(found.work) == []
    assert os.listdir(found.state) == []


def copy_image(disk: initramfsdisks.DebianDisk, place: Place) -> str:
    image = str(place.root / os.path.basename(disk.image))
    shutil.copyfile(disk.image, image)
    return image


def overlay_of(disk: initramfsdisks.DebianDisk, place: Place, name: str) -> str:
    """A qcow2 overlay over the shared ``disk``, for a test that changes it."""
    overlay = str(place.root / name)
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        disk.image,
        "-F",
        "vmdk",
        overlay,
    )
    return overlay


def context(
    image: str,
    place: Place,
    recorder: Recorder,
    should_stop: Any = lambda: False,
    **parameters: Any,
) -> OperationContext:
    spec = {
        "job_id": "job-initramfs",
        "operation": "initramfs_regenerate",
        "image": {"path": image, "format": "vmdk"},
        "parameters": parameters,
        "execution_policy": {"priority": 5},
    }
    return OperationContext(
        "job-initramfs",
        spec,
        recorder,
        should_stop=should_stop,
        allowed_roots=(str(place.root),),
    )


# Independent checks, with the host's tools.


def extract_filesystem(
    image: str, fmt: str, offset: int, size: int, directory: Path
) -> str:
    """The filesystem at ``offset`` of ``image``, as a file of its own."""
    raw = to_raw(image, fmt, str(directory))
    part = str(directory / f"fs-{offset}.raw")
    run(
        "dd",
        f"if={raw}",
        f"of={part}",
        "bs=1M",
        f"skip={offset // MiB}",
        f"count={size // MiB}",
        "conv=sparse",
    )
    os.unlink(raw)
    return part


def dump(filesystem: str, path: str, dest: str) -> str:
    run("debugfs", "-R", f"dump {path} {dest}", filesystem)
    assert os.path.getsize(dest) > 0, f"debugfs found no {path}"
    return dest


def cpio_listing(initrd: str) -> list[str]:
    with open(initrd, "rb") as f:
        magic = f.read(4)
    decompress = {
        b"\x28\xb5\x2f\xfd": ["zstd", "-dc", initrd],
        b"\x1f\x8b\x08\x00": ["gzip", "-dc", initrd],
    }[magic]
    data = subprocess.run(decompress, check=True, capture_output=True).stdout
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=data, check=True, capture_output=True
    ).stdout
    return listing.decode().splitlines()


def modules_in(listing: list[str]) -> set[str]:
    return {os.path.basename(p)[: -len(".ko")] for p in listing if p.endswith(".ko")}


def boot_names(filesystem: str, directory: str) -> set[str]:
    out = run("debugfs", "-R", f"ls -p {directory}", filesystem)
    names = {line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6}
    return names - {".", ".."}


def e2fsck_clean(filesystem: str) -> None:
    result = subprocess.run(
        ["e2fsck", "-n", "-f", filesystem], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# The operation.


def test_rebuilds_with_virtio_on_a_separate_boot(
    separate_boot: initramfsdisks.DebianDisk, place: Place, tmp_path: Path
) -> None:
    disk = separate_boot
    image = copy_image(disk, place)
    source_sha = builders.sha256(image)
    recorder = Recorder()

    result = initramfs_regenerate.run(context(image, place, recorder))

    assert builders.sha256(image) == source_sha
    assert recorder.phases == PHASES
    assert result["tool"] == "update-initramfs"
    assert result["guest"]["boot"] == "partition 2"
    assert result["drivers_added"] == list(VIRTIO)
    assert result["config_changes"] == [
        {"path": "/etc/initramfs-tools/modules", "added": list(VIRTIO)}
    ]
    (kernel,) = result["kernels"]
    assert kernel["version"] == disk.kernel
    assert kernel["initramfs_path"] == f"/boot/initrd.img-{disk.kernel}"
    assert kernel["command"] == ["update-initramfs", "-u", "-k", disk.kernel]
    assert set(kernel["verification"]["modules_in_image"]) == set(VIRTIO)
    output = result["output"]
    assert output["backing_file"] == image and output["source_modified"] is False
    info = json.loads(run("qemu-img", "info", "--output=json", output["path"]))
    assert info["format"] == "qcow2"
    assert info["backing-filename"] == image
    run("qemu-img", "check", output["path"])

    scratch = tmp_path / "check"
    scratch.mkdir()
    before_fs = extract_filesystem(
        image, "vmdk", disk.boot_offset, disk.boot_size, scratch
    )
    before = dump(before_fs, disk.initramfs, str(scratch / "before.img"))
    after_fs = extract_filesystem(
        output["path"], "qcow2", disk.boot_offset, disk.boot_size, scratch
    )
    after = dump(after_fs, disk.initramfs, str(scratch / "after.img"))
    assert builders.sha256(before) == kernel["sha256_before"]
    assert builders.sha256(after) == kernel["sha256_after"]
    assert os.path.getsize(after) == kernel["size_after"]
    assert kernel["sha256_before"] != kernel["sha256_after"]

    old_modules = modules_in(cpio_listing(before))
    new_modules = modules_in(cpio_listing(after))
    assert "vmw_pvscsi" in old_modules and not old_modules & set(VIRTIO)
    assert set(VIRTIO) <= new_modules
    assert "vmw_pvscsi" in new_modules
    # update-initramfs left no .new or .dpkg-bak beside the image.
    assert boot_names(after_fs, "/") == boot_names(before_fs, "/")
    e2fsck_clean(after_fs)

    root_fs = extract_filesystem(
        output["path"], "qcow2", MiB, initramfsdisks.ROOT_MIB * MiB, scratch
    )
    modules_file = run("debugfs", "-R", "cat /etc/initramfs-tools/modules", root_fs)
    assert [line for line in modules_file.splitlines() if line in VIRTIO] == list(
        VIRTIO
    )
    assert boot_names(root_fs, "/boot") == set()
    e2fsck_clean(root_fs)


def test_in_place_with_boot_in_the_root_and_a_chosen_kernel(
    boot_in_root: initramfsdisks.DebianDisk, place: Place, tmp_path: Path
) -> None:
    disk = boot_in_root
    image = copy_image(disk, place)
    source_sha = builders.sha256(image)

    result = initramfs_regenerate.run(
        context(image, place, Recorder(), in_place=True, kernels=[disk.kernel])
    )

    assert result["output"]["in_place"] is True
    assert result["guest"]["boot"] is None
    assert builders.sha256(image) != source_sha
    assert os.listdir(place.root) == [os.path.basename(image)]
    (kernel,) = result["kernels"]
    scratch = tmp_path / "check"
    scratch.mkdir()
    root_fs = extract_filesystem(image, "vmdk", MiB, disk.boot_size, scratch)
    initrd = dump(root_fs, disk.initramfs, str(scratch / "initrd.img"))
    assert builders.sha256(initrd) == kernel["sha256_after"]
    assert set(VIRTIO) <= modules_in(cpio_listing(initrd))
    e2fsck_clean(root_fs)


def test_dry_run_reports_the_command_and_writes_nothing(
    separate_boot: initramfsdisks.DebianDisk, place: Place
) -> None:
    image = copy_image(separate_boot, place)
    source_sha = builders.sha256(image)
    stat_before = os.stat(image)

    result = initramfs_regenerate.run(context(image, place, Recorder(), dry_run=True))

    assert builders.sha256(image) == source_sha
    assert os.stat(image).st_mtime_ns == stat_before.st_mtime_ns
    assert os.listdir(place.root) == [os.path.basename(image)]
    assert result["dry_run"] is True
    assert result["output"] == {"dry_run": True, "path": None, "source_modified": False}
    assert result["tool"] == "update-initramfs"
    assert result["drivers_added"] == []
    assert result["drivers_to_add"] == list(VIRTIO)
    (kernel,) = result["kernels"]
    assert kernel["command"] == [
        "update-initramfs",
        "-u",
        "-k",
        separate_boot.kernel,
    ]
    assert kernel["sha256_before"] and kernel["sha256_after"] is None


def test_a_kernel_the_guest_lacks_is_refused(
    separate_boot: initramfsdisks.DebianDisk, place: Place
) -> None:
    image = copy_image(separate_boot, place)
    with pytest.raises(OperationError) as caught:
        initramfs_regenerate.run(
            context(image, place, Recorder(), dry_run=True, kernels=["9.9.9-none"])
        )
    assert caught.value.code == codes.INVALID_PARAMETERS
    assert separate_boot.kernel in caught.value.message


def test_a_guest_without_an_initramfs_tool(place: Place, tmp_path: Path) -> None:
    built = builders.gpt_ext4_disk(str(tmp_path))
    image = str(place.root / "plain.vmdk")
    shutil.copyfile(built.image, image)
    source_sha = builders.sha256(image)

    with pytest.raises(OperationError) as caught:
        initramfs_regenerate.run(context(image, place, Recorder()))

    error = caught.value
    assert error.code == codes.NO_INITRAMFS_TOOL
    for tool in ("dracut", "update-initramfs", "mkinitcpio"):
        assert tool in error.message
    assert builders.sha256(image) == source_sha
    assert os.listdir(place.root) == ["plain.vmdk"]


def test_a_failing_tool_reports_its_last_output(place: Place, tmp_path: Path) -> None:
    hook = (
        "#!/bin/sh\n"
        'case "$1" in prereqs) echo ""; exit 0;; esac\n'
        'echo "E: the vendor firmware this hook copies is missing" >&2\n'
        "exit 3\n"
    )
    disk = initramfsdisks.debian_disk(
        str(tmp_path / "broken"),
        separate_boot=False,
        extra_files={"/etc/initramfs-tools/hooks/vendor-firmware": (hook, 0o755)},
    )
    image = copy_image(disk, place)
    source_sha = builders.sha256(image)

    with pytest.raises(OperationError) as caught:
        initramfs_regenerate.run(context(image, place, Recorder()))

    error = caught.value
    assert error.code == codes.INITRAMFS_FAILED
    assert error.phase == "regeneration"
    assert "update-initramfs failed" in error.message
    output = "\n".join(error.details["output"])
    assert "the vendor firmware this hook copies is missing" in output
    assert "vendor-firmware failed with return 3" in output
    assert builders.sha256(image) == source_sha
    assert os.listdir(place.root) == [os.path.basename(image)]


def test_cancellation_while_the_tool_runs_leaves_nothing(
    separate_boot: initramfsdisks.DebianDisk, place: Place
) -> None:
    image = copy_image(separate_boot, place)
    source_sha = builders.sha256(image)
    stop = [False]
    seen: list[tuple[str, str]] = []

    def on_event(event: dict[str, Any]) -> None:
        running = event["phase"] == "regeneration" and event["percentage"] is None
        if running and not stop[0]:
            # update-initramfs is running: its first line came out.
            seen.extend(mounts_below(str(place.work)))
            stop[0] = True

    with pytest.raises(OperationError) as caught:
        initramfs_regenerate.run(
            context(image, place, Recorder(on_event), should_stop=lambda: stop[0])
        )

    assert caught.value.code == codes.CANCELLED
    kinds = {fstype for _, fstype in seen}
    assert {"proc", "sysfs", "tmpfs", "ext4"} <= kinds, seen
    assert any(target.endswith("/boot") for target, _ in seen), seen
    assert mounts_below(str(place.work)) == []
    assert builders.sha256(image) == source_sha
    assert os.listdir(place.root) == [os.path.basename(image)]


# A script that opens the overlay argv[1] (sessions in argv[2], ledgers in
# argv[3]), mounts its root and prepares a chroot of it; what is appended
# runs inside, with ``chroot`` at hand.
IN_CHROOT = """
import json, os, signal, sys
from h2k.guest import GuestDisk
from h2k.guest.chroot import prepared
image, workdir, state = sys.argv[1:4]
with GuestDisk.open(image, "qcow2", writable=True, workdir=workdir,
                    state_dir=state) as disk:
    (root_fs,) = [fs for fs in disk.filesystems() if fs.label == "root"]
    with disk.mount(root_fs, writable=True) as root:
        with prepared(disk, root) as chroot:
"""


def run_script(
    script: str, overlay: str, place: Place, *prefix: str
) -> subprocess.CompletedProcess[str]:
    """``script`` in a Python of its own on ``overlay``, run through ``prefix``."""
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-c",
            script,
            overlay,
            str(place.work),
            str(place.state),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


CRASH = (
    IN_CHROOT
    + """\
            print(json.dumps({"root": chroot.root, "mounts": chroot.mounts}),
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
"""
)


def test_cleanup_stale_removes_chroot_mounts_after_a_crash(
    boot_in_root: initramfsdisks.DebianDisk, place: Place
) -> None:
    overlay = overlay_of(boot_in_root, place, "crash.qcow2")
    crashed = run_script(CRASH, overlay, place)
    assert crashed.returncode == -9, crashed.stderr
    left = json.loads(crashed.stdout)
    assert left["mounts"] == ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp"]
    mounted = dict(mounts_below(str(place.work)))
    for guest_dir in left["mounts"]:
        assert left["root"] + guest_dir in mounted, mounted
    assert mounted[left["root"] + "/proc"] == "proc"

    cleaned = cleanup_stale(str(place.state))

    assert len(cleaned) == 1
    assert mounts_below(str(place.work)) == []
    assert not leftovers(str(place.work)).processes


PROBE = (
    IN_CHROOT
    + """\
            with open("/proc/self/mounts") as f:
                dev = [l.split()[1] for l in f if l.split()[1].startswith(
                    chroot.root + "/dev/")]
            probe = chroot.run(["/bin/sh", "-c",
                "echo gone > /dev/null && head -c 3 /dev/zero | wc -c"
                " && ls /dev && readlink /proc/self/root"
                " && hostname changed-by-guest && echo $$"])
print(json.dumps({"dev_binds": dev, "output": probe.stdout}))
"""
)


@pytest.mark.parametrize("mknod", [True, False], ids=["mknod", "no-mknod"])
def test_guest_programs_see_a_minimal_dev_and_their_own_root(
    boot_in_root: initramfsdisks.DebianDisk, place: Place, mknod: bool
) -> None:
    overlay = overlay_of(boot_in_root, place, "probe.qcow2")
    # Without CAP_MKNOD (a container) the host's nodes are bound instead.
    drop = [] if mknod else ["setpriv", "--bounding-set=-mknod", "--"]
    probed = run_script(PROBE, overlay, place, *drop)
    assert probed.returncode == 0, probed.stderr
    found = json.loads(probed.stdout)
    lines = found["output"].split()
    assert lines[0] == "3"
    assert set(lines[1:-2]) == {
        "fd",
        "full",
        "null",
        "pts",
        "random",
        "shm",
        "stderr",
        "stdin",
        "stdout",
        "tty",
        "urandom",
        "zero",
    }
    assert lines[-2] == "/"
    # Its own PID and UTS namespaces: it is process 1, and the host's name
    # is not its to change.
    assert lines[-1] == "1"
    assert os.uname().nodename != "changed-by-guest"
    assert len(found["dev_binds"]) == (0 if mknod else 6)


def test_guest_paths_never_leave_the_root(tmp_path: Path) -> None:
    root = tmp_path / "guest"
    (root / "usr/lib/modules/6.1").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "etc").mkdir()
    (root / "etc/escape").symlink_to("/etc/passwd")
    (root / "etc/up").symlink_to("../../../../etc/shadow")
    (root / "etc/loop").symlink_to("loop")
    base = str(root)
    assert guest_path(base, "/lib/modules/6.1") == f"{base}/usr/lib/modules/6.1"
    assert guest_path(base, "/etc/escape") == f"{base}/etc/passwd"
    assert guest_path(base, "/etc/up") == f"{base}/etc/shadow"
    assert guest_path(base, "/../../boot/x") == f"{base}/boot/x"
    with pytest.raises(OSError):
        guest_path(base, "/etc/loop")
