"""e2fsck and xfs_repair on a block device, and what their answers mean.

Both tools say most of what matters in their exit status, but not the same
way: e2fsck's status is a set of bits (1 corrected, 2 corrected and the
system should reboot, 4 errors left, 8 operational error, 16 usage error,
32 cancelled, 128 library error), while xfs_repair answers 1 for "damaged"
only with ``-n`` and 2 for a log that must be replayed first. Each run is
turned here into one :class:`CheckRun` whose ``state`` the operation can
act on without knowing which tool ran, and whose ``lines`` are the part of
the tool's output a person needs to see what was wrong.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from h2k.tools.process import run_tool

log = logging.getLogger(__name__)

E2FSCK = "e2fsck"
XFS_REPAIR = "xfs_repair"
EXT_TYPES = frozenset({"ext2", "ext3", "ext4"})
XFS_TYPES = frozenset({"xfs"})

# What a run found, whatever the tool.
CLEAN = "clean"
ERRORS = "errors"
CORRECTED = "corrected"
LOG_DIRTY = "log_dirty"
FAILED = "failed"

# e2fsck(8) exit status bits.
E2FSCK_CORRECTED = 1
E2FSCK_REBOOT = 2
E2FSCK_UNCORRECTED = 4
E2FSCK_OPERATIONAL = 8
E2FSCK_USAGE = 16
E2FSCK_CANCELLED = 32
E2FSCK_LIBRARY = 128
_E2FSCK_BITS = (
    (E2FSCK_CORRECTED, "errors corrected"),
    (E2FSCK_REBOOT, "errors corrected, reboot needed"),
    (E2FSCK_UNCORRECTED, "errors left uncorrected"),
    (E2FSCK_OPERATIONAL, "operational error"),
    (E2FSCK_USAGE, "usage or syntax error"),
    (E2FSCK_CANCELLED, "cancelled"),
    (E2FSCK_LIBRARY, "shared library error"),
)
_E2FSCK_BROKEN = E2FSCK_OPERATIONAL | E2FSCK_USAGE | E2FSCK_CANCELLED | E2FSCK_LIBRARY

# xfs_repair(8): -n finds damage -> 1; a log to replay -> 2.
XFS_DAMAGED = 1
XFS_LOG_DIRTY = 2
_XFS_LOG_SIGN = "metadata changes in a log"
# A filesystem of one allocation group has no second superblock to check
# the geometry against; xfs_repair refuses it unless forced.
_XFS_SINGLE_AG = "Only one AG detected"

MAX_LINES = 40
_E2FSCK_NOISE = re.compile(r"^(Pass \d[A-Z]?:|e2fsck \d+\.\d+)")
_XFS_NOISE = re.compile(
    r"^(Phase \d|- |No modify flag set|Cannot get host filesystem geometry|"
    r"Repair may fail if there is a sector size mismatch|the image and the host)"
)


@dataclass(frozen=True)
class CheckRun:
    """One run of a checker: its command, status and what it means."""

    tool: str
    args: list[str]
    exit_code: int
    state: str
    meaning: str
    lines: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": " ".join(self.args),
            "exit_code": self.exit_code,
            "state": self.state,
            "meaning": self.meaning,
        }


def checker_for(fstype: str) -> str | None:
    """The tool h2k checks ``fstype`` with, None when it has none."""
    if fstype in EXT_TYPES:
        return E2FSCK
    if fstype in XFS_TYPES:
        return XFS_REPAIR
    return None


def summary_lines(text: str, noise: re.Pattern[str]) -> list[str]:
    """The lines that tell what the tool found, at most :data:`MAX_LINES`."""
    kept = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not noise.match(line):
            kept.append(line)
    if len(kept) > MAX_LINES:
        dropped = len(kept) - MAX_LINES + 1
        kept = kept[: MAX_LINES - 1] + [f"... {dropped} more lines"]
    return kept


def e2fsck_meaning(code: int) -> tuple[str, str]:
    """The state and the words for an e2fsck exit status."""
    if code == 0:
        return CLEAN, "no errors"
    words = [text for bit, text in _E2FSCK_BITS if code & bit]
    meaning = "; ".join(words) or f"unknown status {code}"
    if code & _E2FSCK_BROKEN:
        return FAILED, meaning
    if code & E2FSCK_UNCORRECTED:
        return ERRORS, meaning
    return CORRECTED, meaning


def xfs_meaning(code: int, output: str, *, repair: bool) -> tuple[str, str]:
    """The state and the words for an xfs_repair run (``repair``: without -n)."""
    if _XFS_LOG_SIGN in output:
        return LOG_DIRTY, "the log holds changes that must be replayed first"
    if _XFS_SINGLE_AG in output:
        return FAILED, (
            "a single allocation group: xfs_repair cannot validate its geometry "
            "(h2k does not force it with -o force_geometry)"
        )
    if code == 0:
        return (CORRECTED, "repaired") if repair else (CLEAN, "no errors")
    if code == XFS_DAMAGED and not repair:
        return ERRORS, "errors found"
    return FAILED, f"xfs_repair failed with status {code}"


def e2fsck(
    device: str,
    *,
    repair: bool,
    should_stop: Callable[[], bool] | None,
    timeout: float | None,
) -> CheckRun:
    """A full check of the ext2/3/4 on ``device``: ``-y`` repairs, ``-n`` only looks."""
    args = [E2FSCK, "-f", "-y" if repair else "-n", device]
    result = run_tool(args, should_stop=should_stop, timeout=timeout, check=False)
    state, meaning = e2fsck_meaning(result.returncode)
    lines = summary_lines(result.stdout + "\n" + result.stderr, _E2FSCK_NOISE)
    log.info("%s: %s (%s)", " ".join(args), meaning, result.returncode)
    return CheckRun(E2FSCK, args, result.returncode, state, meaning, lines)


def xfs_repair(
    device: str,
    *,
    repair: bool,
    should_stop: Callable[[], bool] | None,
    timeout: float | None,
) -> CheckRun:
    """xfs_repair on ``device``; without ``repair`` it runs with ``-n``.

    The log is never zeroed (``-L``): that throws away the changes it holds.
    """
    args = [XFS_REPAIR] + ([] if repair else ["-n"]) + [device]
    result = run_tool(args, should_stop=should_stop, timeout=timeout, check=False)
    output = result.stdout + "\n" + result.stderr
    state, meaning = xfs_meaning(result.returncode, output, repair=repair)
    lines = summary_lines(output, _XFS_NOISE)
    log.info("%s: %s (%s)", " ".join(args), meaning, result.returncode)
    return CheckRun(XFS_REPAIR, args, result.returncode, state, meaning, lines)


def combined_lines(runs: Sequence[CheckRun]) -> list[str]:
    """The summary lines of several runs, each block headed by its command."""
    lines: list[str] = []
    for run in runs:
        lines.append(f"$ {' '.join(run.args)} -> {run.exit_code} ({run.meaning})")
        lines.extend(run.lines)
    return lines
