"""Who a process id is: its start time and command line, read from /proc.

A pid alone names a process only while it lives; after it exits the number
is handed out again. A recorded pid is trusted only when the start time and
the command line still match what was recorded, so that crash recovery never
signals an unrelated process that happens to have the same number.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Fields of /proc/<pid>/stat after the ")" that closes the command name:
# index 0 is the state (field 3), index 19 the start time (field 22).
_STATE_INDEX = 0
_START_INDEX = 19


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start: int
    argv: tuple[str, ...]

    def as_record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "argv": list(self.argv)}


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of a live process, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read().decode("utf-8", errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            cmdline = cmdline_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) <= _START_INDEX or fields[_STATE_INDEX] in ("Z", "X"):
        return None
    argv = tuple(
        part.decode("utf-8", errors="surrogateescape")
        for part in cmdline.split(b"\0")[:-1]
    )
    return ProcessIdentity(pid, int(fields[_START_INDEX]), argv)


def matches(record: Mapping[str, Any]) -> bool:
    """Whether the process ``record`` describes is still the same process."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    current = identify(pid)
    return (
        current is not None
        and current.start == record.get("start")
        and list(current.argv) == record.get("argv")
    )


def working_directory(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
