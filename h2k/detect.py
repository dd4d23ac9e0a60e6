"""What this host can really do, found by doing it on scratch images.

A binary on the PATH proves little: qemu-nbd may lack FUSE to show its
export, loop devices may be missing in a container, the LVM tools may need
device-mapper for what we ask of them. Each capability is therefore
exercised end to end on a scratch image in a temp directory, in rising
order of privilege:

``qemu_img``
    create a qcow2 and read it back with ``qemu-img info``.
``nbd_access``
    serve a scratch image with qemu-nbd on a Unix socket, read it with
    nbdinfo and nbdcopy, and read it again through nbdfuse's raw file.
``mount_operations``
    a read-only loop device over that FUSE file, the ext4 made on the
    scratch image mounted without journal replay, a file read back.
``lvm_tools``
    pvcreate, vgcreate and lvcreate (not activated) on a loop device over a
    scratch file, then pvs, vgs, lvs and pvck read the metadata back, with
    device-mapper switched off as :mod:`h2k.guest.lvm` uses them.

The kernel nbd driver and device-mapper are never required; whether they
are present is only noted. Everything set up is torn down, failure or not;
what a run killed mid-way leaves (its scratch directory, and any mount, loop
device or server in it) is swept by the next run.
Run ``python -m h2k.detect`` to print the reports as JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass

from h2k.capabilities import LVM_TOOLS, MOUNT_OPERATIONS, NBD_ACCESS, ORDER, QEMU_IMG
from h2k.errors import H2KError
from h2k.guest import fstypes, ledger, loop, lvm, mounts, nbd, release
from h2k.guest.daemon import Daemon
from h2k.guest.volume import Volume
from h2k.tools.checksum import sha256_file
from h2k.tools.process import run_tool

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 60.0
SCRATCH_BYTES = 8 * 2**20
PROBE_FILE = "h2k-probe.txt"
SCRATCH_PREFIX = "h2k-detect-"
OWNER_LOCK = ".owner.lock"
# Where the socket goes when the scratch directory is too deep for one.
SHORT_DIR = "/tmp"
UNLOCKED_GRACE_SECONDS = 60.0
_VERSION = re.compile(r"(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class CapabilityReport:
    """Whether ``name`` works here; ``version`` names the tools exercised.

    ``detail`` says why not when it does not, and otherwise notes what was
    optional (the kernel nbd driver, device-mapper).
    """

    name: str
    available: bool
    version: str | None
    detail: str


class _Unavailable(Exception):
    """A probe step that found the capability missing, with the reason."""


def available(reports: dict[str, CapabilityReport]) -> list[str]:
    """The names of the available capabilities, in rising privilege order."""
    return [name for name in ORDER if name in reports and reports[name].available]


class _Probe:
    """One detection run: a scratch directory, a deadline, a teardown stack."""

    def __init__(
        self, scratch: str, socket_dir: str, deadline: float, stack: ExitStack
    ):
        self.scratch = scratch
        self.deadline = deadline
        self.stack = stack
        self.raw = os.path.join(scratch, "disk.raw")
        self.socket = os.path.join(socket_dir, "nbd.sock")
        self.fuse_raw: str | None = None
        self.token = secrets.token_hex(8)
        self.ext4_error: str | None = None

    def left(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise _Unavailable("detection ran out of time")
        return remaining

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def tool(self, argv: Sequence[str]) -> str:
        return run_tool(argv, timeout=self.left()).stdout

    def version(self, argv: Sequence[str], label: str) -> str:
        result = run_tool(argv, timeout=self.left(), check=False)
        match = _VERSION.search(result.stdout + result.stderr)
        if match is None:
            raise _Unavailable(f"{label} reports no version")
        return f"{label} {match.group(1)}"

    def prepare(self) -> None:
        """The scratch disk: an ext4 holding a file, or plain bytes without one."""
        content = self.path("content")
        os.mkdir(content)
        with open(os.path.join(content, PROBE_FILE), "w", encoding="utf-8") as f:
            f.write(self.token)
        with open(self.raw, "wb") as f:
            f.truncate(SCRATCH_BYTES)
        try:
            self.tool(
                ["mkfs.ext4", "-q", "-F", "-L", "h2kprobe", "-d", content, self.raw]
            )
        except H2KError as exc:
            self.ext4_error = str(exc)
            with open(self.raw, "r+b") as f:
                f.write(secrets.token_bytes(SCRATCH_BYTES // 8))

    def qemu_img(self) -> str:
        version = self.version(["qemu-img", "--version"], "qemu-img")
        image = self.path("probe.qcow2")
        self.tool(
            ["qemu-img", "create", "-q", "-f", "qcow2", image, str(SCRATCH_BYTES)]
        )
        info = json.loads(
            self.tool(["qemu-img", "info", "--output=json", "-f", "qcow2", image])
        )
        if info.get("format") != "qcow2" or info.get("virtual-size") != SCRATCH_BYTES:
            raise _Unavailable(f"qemu-img info reads back {info!r}")
        return version

    def nbd_access(self) -> str:
        versions = [
            self.version(["qemu-nbd", "--version"], "qemu-nbd"),
            self.version(["nbdinfo", "--version"], "libnbd"),
            self.version(["nbdfuse", "--version"], "nbdfuse"),
        ]
        server = nbd.serve(
            self.raw,
            "raw",
            self.socket,
            read_only=True,
            cwd=self.scratch,
            log_path=self.path("qemu-nbd.log"),
        )
        self.stack.callback(_quietly, server.stop)
        size = nbd.wait_served(server, self.socket, timeout=self.left())
        if size != SCRATCH_BYTES:
            raise _Unavailable(f"qemu-nbd serves {size} bytes of {SCRATCH_BYTES}")
        uri = nbd.nbd_uri(self.socket)
        export = json.loads(self.tool(["nbdinfo", "--json", uri]))["exports"][0]
        if not export.get("is_read_only"):
            raise _Unavailable("qemu-nbd --read-only serves a writable export")
        copy = self.path("copy.raw")
        self.tool(["nbdcopy", uri, copy])
        expected = sha256_file(self.raw)
        if sha256_file(copy) != expected:
            raise _Unavailable("nbdcopy read other bytes than the image holds")
        self.fuse_raw = self._expose(expected)
        return ", ".join(versions)

    def _expose(self, expected: str) -> str:
        mountpoint = self.path("fuse")
        os.mkdir(mountpoint)
        view = nbd.expose(
            mountpoint,
            "disk.raw",
            self.socket,
            read_only=True,
            pid_file=self.path("nbdfuse.pid"),
            cwd=self.scratch,
            log_path=self.path("nbdfuse.log"),
        )
        self.stack.callback(_quietly, _unexpose, view, mountpoint)
        raw = os.path.join(mountpoint, "disk.raw")
        nbd.wait_exposed(view, self.path("nbdfuse.pid"), raw, timeout=self.left())
        if sha256_file(raw) != expected:
            raise _Unavailable("the nbdfuse file holds other bytes than the image")
        return raw

    def mount_operations(self) -> str:
        if self.fuse_raw is None:
            raise _Unavailable("needs the raw FUSE view of nbd_access, which failed")
        if self.ext4_error is not None:
            raise _Unavailable(f"mkfs.ext4 failed: {self.ext4_error}")
        versions = [
            self.version(["mount", "--version"], "util-linux"),
            self.version(["mkfs.ext4", "-V"], "e2fsprogs"),
        ]
        with ExitStack() as steps:
            device = loop.attach(self.fuse_raw, read_only=True, timeout=self.left())
            steps.callback(loop.detach, device, self.fuse_raw)
            target = self.path("mnt")
            os.mkdir(target)
            chosen = fstypes.mount_options("ext4", writable=False)
            assert chosen is not None
            kernel_type, options = chosen
            mounts.mount(device, target, kernel_type, options, timeout=self.left())
            steps.callback(mounts.unmount, target)
            with open(os.path.join(target, PROBE_FILE), encoding="utf-8") as f:
                if f.read() != self.token:
                    raise _Unavailable("the mounted ext4 holds another file")
        return ", ".join(versions)

    def lvm_tools(self) -> str:
        version = self.version(["pvs", "--driverloaded", "n", "--version"], "lvm")
        pv_file = self.path("pv.raw")
        with open(pv_file, "wb") as f:
            f.truncate(SCRATCH_BYTES)
        system_dir = self.path("lvm")
        os.mkdir(system_dir)
        vg_name = f"h2kprobe{self.token}"
        with ExitStack() as steps:
            device = loop.attach(pv_file, read_only=False, timeout=self.left())
            steps.callback(loop.detach, device, pv_file)

            def write(command: str, *args: str) -> None:
                lvm.run_lvm(
                    command,
                    [device],
                    *args,
                    system_dir=system_dir,
                    read_only=False,
                    timeout=self.left(),
                )

            write("pvcreate", device)
            write("vgcreate", vg_name, device)
            write(
                "lvcreate",
                "--activate",
                "n",
                "--zero",
                "n",
                "-l",
                "1",
                "-n",
                "probe",
                vg_name,
            )
            pvs, lvs = lvm.read_lvm(
                {device: Volume("probe", 0, SCRATCH_BYTES)},
                system_dir=system_dir,
                timeout=self.left(),
            )
            if [pv.vg_name for pv in pvs] != [vg_name]:
                raise _Unavailable(f"pvs reads back {pvs!r}")
            if len(lvs) != 1 or lvs[0].volume is None:
                raise _Unavailable(f"lvs reads back {lvs!r}")
            if lvs[0].volume.offset != pvs[0].pe_start:
                raise _Unavailable("the logical volume is not where lvs says")
            vgs = lvm.run_lvm(
                "vgs",
                [device],
                "--noheadings",
                "-o",
                "vg_name",
                system_dir=system_dir,
                timeout=self.left(),
            ).stdout
            dump = lvm.run_lvm(
                "pvck",
                [device],
                "--dump",
                "metadata",
                device,
                system_dir=system_dir,
                read_only=False,
                timeout=self.left(),
            ).stdout
            if vg_name not in vgs or vg_name not in dump:
                raise _Unavailable("vgs or pvck do not read the volume group back")
        return version


def _quietly(teardown: Callable[..., None], *args: object) -> None:
    """Run a teardown step of the shared stack; a failure is logged, not raised."""
    try:
        teardown(*args)
    except (H2KError, OSError) as exc:
        log.error("detection teardown %s failed: %s", teardown.__name__, exc)


def _unexpose(view: Daemon, mountpoint: str) -> None:
    mounts.unmount_fuse(mountpoint)
    if not view.exit_gracefully():
        view.stop()


def _device_mapper_present() -> bool:
    # Not /dev/mapper/control: LVM creates that node even without the driver.
    try:
        with open("/proc/misc", encoding="utf-8") as f:
            return any(line.split()[-1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def _notes() -> dict[str, str]:
    """What each capability did without, for the reports of those that work."""
    nbd = "present" if os.path.exists("/dev/nbd0") else "absent"
    dm = "present" if _device_mapper_present() else "absent"
    return {
        QEMU_IMG: "",
        NBD_ACCESS: f"user-space NBD and FUSE; kernel nbd devices {nbd}, not needed",
        MOUNT_OPERATIONS: (
            f"loop devices over the FUSE view; kernel nbd devices {nbd}, not needed"
        ),
        LVM_TOOLS: (
            f"metadata read and written with device-mapper off; device-mapper "
            f"{dm}, not needed (logical volumes are never activated)"
        ),
    }


def _run(name: str, step: Callable[[], str], detail: str) -> CapabilityReport:
    started = time.monotonic()
    try:
        version = step()
    except _Unavailable as exc:
        return CapabilityReport(name, False, None, str(exc))
    except (H2KError, OSError, ValueError, KeyError, IndexError) as exc:
        log.info("capability %s is unavailable: %s", name, exc)
        return CapabilityReport(name, False, None, f"{type(exc).__name__}: {exc}")
    log.debug("capability %s checked in %.2fs", name, time.monotonic() - started)
    return CapabilityReport(name, True, version, detail)


def _claim_scratch(parent: str | None, locks: list[int]) -> str:
    """A new scratch directory, marked as this run's by a lock held inside."""
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent)
    fd = ledger.try_lock(os.path.join(scratch, OWNER_LOCK), create=True)
    if fd is not None:
        locks.append(fd)
    return scratch


def _sweep_abandoned(parent: str) -> None:
    """Take down what detection runs that died mid-way (SIGKILL, OOM) left.

    A run holds the lock inside its scratch directory until it is done, and
    the kernel drops it when the run dies; a directory whose lock nobody
    holds is swept (mounts, loop devices, servers, files). One without a
    lock is only swept once it is old, since a run creates the lock right
    after the directory.
    """
    for parent_dir in {parent, SHORT_DIR}:
        pattern = os.path.join(glob.escape(parent_dir), f"{SCRATCH_PREFIX}*")
        for directory in glob.glob(pattern):
            lock = os.path.join(directory, OWNER_LOCK)
            fd = None
            try:
                if os.path.exists(lock):
                    fd = ledger.try_lock(lock, create=False)
                    if fd is None:
                        continue
                elif time.time() - os.path.getmtime(directory) < UNLOCKED_GRACE_SECONDS:
                    continue
                log.warning("sweeping %s, left by a detection run that died", directory)
                release.sweep(directory)
            except (H2KError, OSError) as exc:
                log.error("cannot sweep %s: %s", directory, exc)
            finally:
                if fd is not None:
                    os.close(fd)


def detect_capabilities(
    workdir: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> dict[str, CapabilityReport]:
    """Exercise every capability; the reports in rising privilege order.

    ``workdir`` holds the scratch directory (default: the system temp dir);
    ``timeout`` bounds the whole run.
    """
    deadline = time.monotonic() + timeout
    notes = _notes()
    _sweep_abandoned(workdir or tempfile.gettempdir())
    locks: list[int] = []
    try:
        scratch = _claim_scratch(workdir, locks)
    except OSError as exc:
        detail = f"no scratch directory: {exc}"
        return {name: CapabilityReport(name, False, None, detail) for name in ORDER}
    socket_dir = scratch
    reports: dict[str, CapabilityReport] = {}
    try:
        if len(os.path.join(scratch, "nbd.sock").encode()) > nbd.MAX_SOCKET_PATH:
            # Too deep for a Unix socket path.
            socket_dir = _claim_scratch(SHORT_DIR, locks)
        with ExitStack() as stack:
            probe = _Probe(scratch, socket_dir, deadline, stack)
            probe.prepare()
            for name, step in (
                (QEMU_IMG, probe.qemu_img),
                (NBD_ACCESS, probe.nbd_access),
                (MOUNT_OPERATIONS, probe.mount_operations),
                (LVM_TOOLS, probe.lvm_tools),
            ):
                reports[name] = _run(name, step, notes[name])
    except (OSError, _Unavailable) as exc:
        detail = f"cannot prepare the scratch image: {exc}"
        for name in ORDER:
            reports.setdefault(name, CapabilityReport(name, False, None, detail))
    finally:
        for directory in {scratch, socket_dir}:
            try:
                release.sweep(directory)
            except (H2KError, OSError) as exc:
                log.error("detection left %s behind: %s", directory, exc)
        for fd in locks:
            os.close(fd)
    return {name: reports[name] for name in ORDER}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m h2k.detect",
        description="Exercise h2k's capabilities on this host; print JSON.",
    )
    parser.add_argument("--workdir", help="where the scratch directory goes")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    reports = detect_capabilities(args.workdir, args.timeout)
    output = {
        "capabilities": {name: asdict(report) for name, report in reports.items()},
        "available": available(reports),
        "seconds": round(time.monotonic() - started, 2),
    }
    json.dump(output, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
