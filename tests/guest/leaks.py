"""What a guest session may leave on the host, looked up without h2k's help.

Other work shares the host, so only what belongs to one directory counts:
mounts below it (including its FUSE mount), loop devices backed by files in
it, and live processes whose command line names it. A test sends the
sessions it starts into directories of its own (:func:`isolate_sessions`)
and checks afterwards that they left nothing there (:func:`assert_clean`).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Leftovers:
    mounts: list[str]
    fuse_mounts: list[str]
    loops: list[str]
    processes: list[str]

    @property
    def empty(self) -> bool:
        return not (self.mounts or self.fuse_mounts or self.loops or self.processes)


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def _live(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _mount_table() -> Iterator[tuple[str, str, list[str]]]:
    """(target, type, options) of every mount this process sees."""
    with open("/proc/mounts", encoding="utf-8") as f:
        for line in f:
            _, target, fstype, options, *_ = line.split()
            yield _unescape(target), fstype, options.split(",")


def mounts_below(directory: str) -> list[tuple[str, str]]:
    """(target, type) of the mounts inside ``directory``."""
    prefix = directory.rstrip("/") + "/"
    return [(t, fstype) for t, fstype, _ in _mount_table() if t.startswith(prefix)]


def leftovers(directory: str) -> Leftovers:
    prefix = directory.rstrip("/") + "/"
    mounts: list[str] = []
    fuse_mounts: list[str] = []
    for target, fstype, _ in _mount_table():
        if target.startswith(prefix) or target == directory:
            (fuse_mounts if fstype.startswith("fuse") else mounts).append(target)
    output = subprocess.run(
        ["losetup", "--list", "--json"], check=True, capture_output=True, text=True
    ).stdout
    rows = json.loads(output)["loopdevices"] if output.strip() else []
    loops = [
        row["name"] for row in rows if (row.get("back-file") or "").startswith(prefix)
    ]
    processes = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if directory in cmdline and _live(pid) and int(pid) != os.getpid():
            processes.append(f"{pid}: {cmdline.strip()}")
    return Leftovers(mounts, fuse_mounts, loops, processes)


def isolate_sessions(monkeypatch: pytest.MonkeyPatch, work: str, state: str) -> None:
    """Guest sessions make their directories in ``work``, their ledgers in
    ``state``, for the rest of the test."""
    monkeypatch.setenv("H2K_GUEST_STATE_DIR", state)
    monkeypatch.setattr(tempfile, "tempdir", work)


def assert_clean(directory: str, *emptied: str) -> None:
    """Nothing of a session is left below ``directory``; ``emptied`` are empty."""
    found = leftovers(directory)
    assert found.empty, found
    for path in emptied:
        assert os.listdir(path) == []


def mount_entry(target: str) -> tuple[str, list[str]]:
    """The filesystem type and options of the mount at ``target``."""
    for where, fstype, options in _mount_table():
        if where == target:
            return fstype, options
    raise AssertionError(f"nothing is mounted at {target}")
