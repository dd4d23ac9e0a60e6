"""What a volume holds, from blkid's low-level probe of the raw view.

``blkid -p`` reads the signatures itself (no cache, no udev), and with
``--offset``/``--size`` it probes one byte range of a plain file, so no
block device is needed to tell an ext4 from an LVM physical volume.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from h2k.errors import ToolError
from h2k.guest.volume import Volume
from h2k.tools.process import run_tool

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 60.0
# blkid's exit status when it finds nothing, and when it finds several
# signatures that contradict each other.
NOTHING_FOUND = 2
AMBIVALENT = 8
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Filesystem:
    """What blkid found on ``volume``.

    ``usage`` is blkid's class: ``"filesystem"``, ``"raid"`` (an LVM
    physical volume, md member), ``"crypto"`` (LUKS) or ``"other"`` (swap).
    """

    volume: Volume
    type: str
    usage: str | None
    label: str | None
    uuid: str | None
    version: str | None


def parse_export(text: str) -> dict[str, str]:
    """Read ``blkid --output export`` lines (``KEY=value``, backslash-escaped)."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = _ESCAPE.sub(r"\1", value)
    return values


def probe(
    raw_path: str,
    volume: Volume,
    *,
    should_stop: Callable[[], bool] | None = None,
    timeout: float = TIMEOUT_SECONDS,
) -> Filesystem | None:
    """The signature on ``volume`` of ``raw_path``, None when there is none."""
    argv = [
        "blkid",
        "--probe",
        "--offset",
        str(volume.offset),
        "--size",
        str(volume.size),
        "--output",
        "export",
        raw_path,
    ]
    result = run_tool(argv, should_stop=should_stop, timeout=timeout, check=False)
    if result.returncode == NOTHING_FOUND:
        return None
    if result.returncode == AMBIVALENT:
        log.warning("%s holds contradicting signatures; left unidentified", volume)
        return None
    if result.returncode != 0:
        raise ToolError("blkid", argv, result.returncode, result.stderr)
    values = parse_export(result.stdout)
    if "TYPE" not in values:
        return None
    return Filesystem(
        volume=volume,
        type=values["TYPE"],
        usage=values.get("USAGE"),
        label=values.get("LABEL"),
        uuid=values.get("UUID"),
        version=values.get("VERSION"),
    )
