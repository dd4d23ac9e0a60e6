"""The on-disk record of what a guest-disk session set up.

A worker can die between setting something up and tearing it down (OOM
kill, SIGKILL, power loss of the container). Each session therefore writes
every resource it creates (temp dir, qemu-nbd, FUSE mount, loop device,
mount) to ``<state_dir>/<session>.json`` before or right after creating it,
and removes it once torn down, so :func:`h2k.guest.stale.cleanup_stale` can
finish the job later.

Whether a session is still alive is told by a lock, not by a pid: the owner
holds an exclusive ``flock`` on ``<session>.lock`` for as long as it runs,
the kernel drops it when the owner dies however it dies, and a pid reused by
another process cannot hold it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from typing import Any

from h2k.errors import Conflict
from h2k.guest import procinfo

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/h2k/guest"
STATE_DIR_ENV = "H2K_GUEST_STATE_DIR"
FORMAT_VERSION = 1


def state_dir_or_default(state_dir: str | None) -> str:
    """``state_dir``, else ``$H2K_GUEST_STATE_DIR``, else /var/lib/h2k/guest."""
    return state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def ledger_path(state_dir: str, session_id: str) -> str:
    return os.path.join(state_dir, f"{session_id}.json")


def lock_path(state_dir: str, session_id: str) -> str:
    return os.path.join(state_dir, f"{session_id}.lock")


def try_lock(path: str, create: bool) -> int | None:
    """An open descriptor holding the lock on ``path``, None if someone has it."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _create_locked(path: str) -> int:
    """Create the lock file at ``path`` already locked.

    It is locked under a temporary name and then renamed, so that a
    concurrent cleanup never finds it unlocked and takes the session for dead.
    """
    tmp = f"{path}.new-{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.exists(path):
            raise Conflict(f"guest session lock {path} exists already")
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd


def write_atomically(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


class Ledger:
    """The live record of one session, locked for as long as it is open."""

    def __init__(self, state_dir: str, session_id: str, info: dict[str, Any]):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.state_dir = state_dir
        self.session_id = session_id
        self.path = ledger_path(state_dir, session_id)
        self._lock_path = lock_path(state_dir, session_id)
        self._lock_fd: int | None = _create_locked(self._lock_path)
        owner = procinfo.identify(os.getpid())
        self._data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "session": session_id,
            "created": time.time(),
            "owner": owner.as_record() if owner else {"pid": os.getpid()},
            **info,
            "resources": [],
        }
        self._next_id = 1
        self._save()

    def _save(self) -> None:
        write_atomically(self.path, self._data)

    @property
    def resources(self) -> list[dict[str, Any]]:
        return list(self._data["resources"])

    def add(self, record: dict[str, Any]) -> int:
        """Record a resource; the returned id removes it again."""
        entry = {"id": self._next_id, **record}
        self._next_id += 1
        self._data["resources"].append(entry)
        self._save()
        return int(entry["id"])

    def update(self, entry_id: int, **fields: Any) -> None:
        for entry in self._data["resources"]:
            if entry["id"] == entry_id:
                entry.update(fields)
        self._save()

    def remove(self, entry_id: int) -> None:
        resources = self._data["resources"]
        self._data["resources"] = [r for r in resources if r["id"] != entry_id]
        self._save()

    def close(self, *, keep: bool) -> None:
        """Give up the session: delete the record, or ``keep`` it for recovery.

        A kept record (teardown left something behind) is unlocked, so the
        next :func:`h2k.guest.stale.cleanup_stale` takes it over.
        """
        if self._lock_fd is None:
            return
        if not keep:
            for path in (self.path, self._lock_path):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        else:
            log.warning(
                "guest session %s left resources behind; recorded in %s",
                self.session_id,
                self.path,
            )
        os.close(self._lock_fd)
        self._lock_fd = None
