"""Serve an image over NBD on a Unix socket and show it as a raw file.

qemu-nbd reads every format qemu knows and serves the guest's raw bytes on a
Unix socket; nothing of it needs the kernel's nbd driver. libnbd tools read
that socket directly, and nbdfuse turns it into one raw file in a FUSE mount,
which loop devices, sfdisk and blkid take like any file. The format is always
given with ``-f``: letting qemu guess would let a guest that wrote an image
header into its own disk change how the host reads it.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable

from h2k.guest.daemon import Daemon
from h2k.tools import qemu_img
from h2k.tools.process import run_tool

# A Unix socket path must fit in sun_path (108 bytes with the final NUL).
MAX_SOCKET_PATH = 107
# qemu-nbd serves this many clients at once: nbdfuse opens up to four
# connections (multi-conn), libnbd tools one each.
SHARED_CLIENTS = 16
PROBE_TIMEOUT_SECONDS = 10.0


def nbd_uri(socket_path: str) -> str:
    return "nbd+unix:///?socket=" + urllib.parse.quote(socket_path, safe="/")


def serve(
    image: str,
    fmt: str,
    socket_path: str,
    *,
    read_only: bool,
    cwd: str,
    log_path: str,
) -> Daemon:
    """Start qemu-nbd on ``socket_path``; wait for it with :func:`wait_served`.

    ``--persistent`` keeps it serving between clients (the readiness probe
    is one), so it ends only when stopped.
    """
    if not os.path.isabs(socket_path):
        raise ValueError("qemu-nbd needs an absolute socket path")
    if len(socket_path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path longer than {MAX_SOCKET_PATH} bytes")
    if fmt in qemu_img.READ_OPTIONS:
        # Read as convert reads it (a VHD at its footer's size, say).
        argv = ["qemu-nbd", "--image-opts"]
        target = qemu_img.image_opts(image, qemu_img.WIRE_FORMATS[fmt])
    else:
        argv = ["qemu-nbd", "-f", fmt]
        # An absolute path never reads as a protocol prefix ("nbd:", "json:").
        target = os.path.abspath(image)
    if read_only:
        argv.append("--read-only")
    argv += ["--persistent", f"--shared={SHARED_CLIENTS}", "-k", socket_path, target]
    return Daemon(argv, cwd=cwd, log_path=log_path)


def export_size(uri: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> int | None:
    """The export's size in bytes, None while the server does not answer."""
    result = run_tool(["nbdinfo", "--size", uri], check=False, timeout=timeout)
    if result.returncode != 0:
        return None
    try:
        return int(result.stdout.strip())
    except ValueError:
        return None


def wait_served(
    server: Daemon,
    socket_path: str,
    *,
    timeout: float,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Wait until qemu-nbd answers on its socket; return the export size."""
    uri = nbd_uri(socket_path)
    size: list[int] = []

    def answers() -> bool:
        if not os.path.exists(socket_path):
            return False
        found = export_size(uri)
        if found is None:
            return False
        size.append(found)
        return True

    server.wait_until(answers, timeout=timeout, should_stop=should_stop)
    return size[0]


def expose(
    mountpoint: str,
    filename: str,
    socket_path: str,
    *,
    read_only: bool,
    pid_file: str,
    cwd: str,
    log_path: str,
) -> Daemon:
    """Start nbdfuse: ``mountpoint/filename`` becomes the raw disk.

    Wait for it with :func:`wait_exposed`; end it with
    :func:`h2k.guest.mounts.unmount_fuse`, after which it exits by itself.
    """
    argv = ["nbdfuse", "-P", pid_file]
    if read_only:
        argv.append("--readonly")
    argv += [os.path.join(mountpoint, filename), "--unix", socket_path]
    return Daemon(argv, cwd=cwd, log_path=log_path)


def wait_exposed(
    view: Daemon,
    pid_file: str,
    raw_path: str,
    *,
    timeout: float,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Wait until nbdfuse serves: it writes its pid file once it is ready."""

    def ready() -> bool:
        return os.path.exists(pid_file) and os.path.exists(raw_path)

    view.wait_until(ready, timeout=timeout, should_stop=should_stop)
