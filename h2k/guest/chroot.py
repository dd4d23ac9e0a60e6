"""Run the guest's own programs inside its mounted root.

Some repairs can only be done by the guest's tools (dracut, update-initramfs
and mkinitcpio know their own distribution), and those expect a running
system: ``/proc`` (``/proc/self/fd``, ``/proc/mounts``), ``/sys``,
``/dev/null`` and ``/dev/fd`` for their shell redirections, and scratch
space in ``/tmp``, ``/var/tmp`` and ``/run``. :func:`prepared` mounts these
into a guest root that a :class:`h2k.guest.GuestDisk` session mounted
read-write, each through :meth:`GuestDisk.mount_at`, so every mount is in
the session's ledger before it exists and is taken down, last first, before
the guest filesystem under it: by the session's teardown, or by
:func:`h2k.guest.cleanup_stale` after a crash.

What the guest sees of the host is kept small. Its ``/dev`` is a fresh
tmpfs with only null, zero, full, random, urandom and tty in it, never the
host's disks; ``/sys`` is read-only; ``/tmp``, ``/var/tmp`` and ``/run``
are private tmpfs, so scratch files never land in the image. Each program
runs in new PID, network, IPC and UTS namespaces (``unshare``): whatever it
starts dies with it, it reaches no network, and nothing of it is left to
keep a mount busy. Paths in the guest are resolved as the guest would
resolve them (:func:`guest_path`), so a symlink in the image never points
the host at one of its own files.

This is containment against accidents, not a sandbox against a hostile
image: the guest's programs run as root.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from h2k.errors import OperationError
from h2k.guest import codes
from h2k.guest.disk import GuestDisk
from h2k.tools.process import ToolResult, run_tool

log = logging.getLogger(__name__)

# The guest's programs get this environment, none of the worker's.
ENVIRONMENT = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C",
    "LC_ALL": "C",
    "TERM": "dumb",
    "TMPDIR": "/tmp",
}
ISOLATION = (
    "unshare",
    "--pid",
    "--fork",
    "--kill-child",
    "--net",
    "--ipc",
    "--uts",
    "--",
)
# (name, major, minor) of the character devices the guest's /dev holds.
DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
DEVICE_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
# Scratch directories and their modes; skipped when the guest has none.
SCRATCH = (("/run", 0o755), ("/tmp", 0o1777), ("/var/tmp", 0o1777))
MAX_SYMLINKS = 40
LEFTOVER_WAIT_SECONDS = 5.0


def guest_path(root: str, path: str) -> str:
    """The host path of the guest's ``path``, symlinks resolved inside ``root``.

    An absolute link restarts at ``root`` and ``..`` stops there, as in a
    chroot, so the answer never leaves ``root``. It need not exist.
    """
    root = root.rstrip(os.sep) or os.sep
    parts: list[str] = []
    pending = [p for p in path.split("/") if p]
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        candidate = os.path.join(root, *parts, part)
        if not os.path.islink(candidate):
            parts.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, "too many symbolic links in the guest", path)
        link = os.readlink(candidate)
        if link.startswith("/"):
            parts = []
        pending = [p for p in link.split("/") if p] + pending
    return os.path.join(root, *parts)


@dataclass
class Chroot:
    """A prepared guest root; :meth:`run` runs a guest program in it."""

    root: str
    mounts: list[str] = field(default_factory=list)

    def path(self, guest: str) -> str:
        """The host path of the guest's ``guest`` path."""
        return guest_path(self.root, guest)

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs the guest's ``argv`` in this root."""
        return [*ISOLATION, "chroot", self.root, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        on_line: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> ToolResult:
        """Run the guest's ``argv`` (a path in the guest, and arguments)."""
        return run_tool(
            self.command(argv),
            on_line=on_line,
            should_stop=should_stop,
            timeout=timeout,
            check=check,
            cwd="/",
            env=dict(ENVIRONMENT),
        )


def _mountpoint(root: str, guest_dir: str, *, create: bool) -> str | None:
    """The host directory to mount on for the guest's ``guest_dir``.

    No symlink is followed: every component must be a real directory.
    A missing last component is created when ``create``; otherwise, and
    for anything that is not a plain directory, the answer is None.
    """
    current = root
    names = [p for p in guest_dir.split("/") if p]
    for index, name in enumerate(names):
        current = os.path.join(current, name)
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            if not create or index != len(names) - 1:
                return None
            os.mkdir(current, 0o755)
            continue
        if not stat.S_ISDIR(mode):
            return None
    return current


def _required(root: str, guest_dir: str, phase: str, *, create: bool = True) -> str:
    target = _mountpoint(root, guest_dir, create=create)
    if target is None:
        raise OperationError(
            phase,
            codes.MOUNT_FAILED,
            f"the guest's {guest_dir} is missing or not a plain directory "
            "(a symlink or a file); h2k does not mount over it",
        )
    return target


@contextlib.contextmanager
def bind(
    disk: GuestDisk,
    root: str,
    guest_dir: str,
    source: str,
    *,
    create: bool = False,
    phase: str = "chroot",
) -> Iterator[str]:
    """Bind ``source`` onto the guest's ``guest_dir`` under ``root``.

    For a guest filesystem mounted elsewhere by the session (its /boot)
    that must appear where the guest expects it. ``create`` makes a
    missing ``guest_dir``; a read-only root cannot.
    """
    target = _required(os.path.realpath(root), guest_dir, phase, create=create)
    with disk.mount_at(source, target, "none", ["bind"]):
        yield target


def _populate_dev(disk: GuestDisk, dev: str, stack: contextlib.ExitStack) -> None:
    """Device nodes and /dev/fd links in the guest's fresh /dev tmpfs.

    Where the host refuses mknod (a container without CAP_MKNOD), the
    host's own node is bound onto an empty file instead.
    """
    for name, major, minor in DEVICES:
        path = os.path.join(dev, name)
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            os.chmod(path, 0o666)
        except PermissionError:
            with open(path, "x", encoding="utf-8"):
                pass
            stack.enter_context(disk.mount_at(f"/dev/{name}", path, "none", ["bind"]))
    for name, target in DEVICE_LINKS:
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "pts"), 0o755)
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)


def _processes_in(root: str) -> list[int]:
    """Processes whose root directory is ``root`` or below it."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            where = os.readlink(f"/proc/{name}/root")
        except OSError:
            continue
        if where == root or where.startswith(root + os.sep):
            found.append(int(name))
    return found


def stop_processes_in(root: str) -> None:
    """Kill whatever still runs inside ``root``, so its mounts can go."""
    pids = _processes_in(root)
    for pid in pids:
        log.warning("killing process %d left running in the guest root %s", pid, root)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_WAIT_SECONDS
    while pids and _processes_in(root) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def prepared(disk: GuestDisk, root: str, *, phase: str = "chroot") -> Iterator[Chroot]:
    """Make ``root``, a read-write mount of ``disk``, ready for a chroot.

    Everything is unmounted on the way out, and anything still running in
    the root is killed first. ``phase`` goes into the errors raised.
    """
    root = os.path.realpath(root)
    chroot = Chroot(root)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            disk.mount_at(
                "proc",
                _required(root, "/proc", phase),
                "proc",
                ["nosuid", "nodev", "noexec"],
            )
        )
        chroot.mounts.append("/proc")
        stack.enter_context(
            disk.mount_at(
                "sysfs",
                _required(root, "/sys", phase),
                "sysfs",
                ["ro", "nosuid", "nodev", "noexec"],
            )
        )
        chroot.mounts.append("/sys")
        dev = _required(root, "/dev", phase)
        stack.enter_context(
            disk.mount_at(
                "h2k-dev", dev, "tmpfs", ["mode=755", "nosuid", "noexec", "size=1m"]
            )
        )
        chroot.mounts.append("/dev")
        _populate_dev(disk, dev, stack)
        for guest_dir, mode in SCRATCH:
            target = _mountpoint(root, guest_dir, create=False)
            if target is None:
                log.info("the guest has no plain %s; no scratch tmpfs there", guest_dir)
                continue
            stack.enter_context(
                disk.mount_at(
                    "h2k-scratch",
                    target,
                    "tmpfs",
                    [f"mode={mode:o}", "nosuid", "nodev"],
                )
            )
            chroot.mounts.append(guest_dir)
        # Runs first on the way out: nothing may keep the mounts busy.
        stack.callback(stop_processes_in, root)
        yield chroot
