"""Tear down one recorded resource, whoever recorded it and whatever is left.

The same functions serve a live session's teardown and crash recovery, so
they take the ledger's records and assume nothing: each first checks that
the resource is still there and still the one recorded, and does nothing
when it is not. A session's private directory is swept before it is
removed: anything mounted below it, any loop device backed by a file in it
and any of its servers is taken down, which also catches what a crash left
between creating a resource and recording it. Nothing is ever deleted
through a mount that is still in place.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

from h2k.errors import H2KError
from h2k.guest import daemon, loop, mounts, procinfo

log = logging.getLogger(__name__)

# The servers a session starts with its private directory as working
# directory; a sweep stops only these.
SERVER_TOOLS = ("qemu-nbd", "nbdfuse")
FUSE_EXIT_SECONDS = 5.0


class ResourceBusy(H2KError):
    """Something the sweep could not take down keeps a directory in use."""


def _is_fuse(entry: mounts.MountEntry) -> bool:
    return entry.fstype.split(".")[0] in mounts.FUSE_TYPES


def _servers_in(directory: str) -> list[dict[str, Any]]:
    found = []
    for pid in procinfo.all_pids():
        if procinfo.working_directory(pid) != directory:
            continue
        identity = procinfo.identify(pid)
        if (
            identity
            and identity.argv
            and (os.path.basename(identity.argv[0]) in SERVER_TOOLS)
        ):
            found.append(identity.as_record())
    return found


def sweep(directory: str) -> None:
    """Take down everything that lives in ``directory``, then remove it."""
    directory = os.path.abspath(directory)
    if not os.path.lexists(directory):
        return
    for entry in mounts.mounted_under(directory):
        if not _is_fuse(entry):
            mounts.unmount(entry.target)
    for device in loop.backed_under(directory):
        loop.detach(device.device, device.backing)
    for entry in mounts.mounted_under(directory):
        if _is_fuse(entry):
            mounts.unmount_fuse(entry.target)
    for record in _servers_in(directory):
        daemon.stop_recorded(record)
    left = mounts.mounted_under(directory)
    if left:
        raise ResourceBusy(
            f"{directory} still has mounts ({', '.join(e.target for e in left)}); "
            "left in place"
        )
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        pass


def release(record: dict[str, Any]) -> None:
    """Tear down what ``record`` describes, if it is still there."""
    kind = record.get("kind")
    log.debug("releasing %s", record)
    if kind == "mount":
        mounts.unmount(record["target"])
    elif kind == "loop":
        if record.get("device"):
            loop.detach(record["device"], record["backing"])
    elif kind == "fuse":
        mounts.unmount_fuse(record["mountpoint"])
        server = record.get("process")
        # Unmounted, nbdfuse exits by itself; a signal is for one that hangs.
        if server and not daemon.wait_gone(server, FUSE_EXIT_SECONDS):
            daemon.stop_recorded(server)
    elif kind == "process":
        daemon.stop_recorded(record["process"])
    elif kind == "dir":
        sweep(record["path"])
    else:
        log.warning("unknown resource kind in a guest ledger: %s", record)
