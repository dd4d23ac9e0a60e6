"""A byte range of the raw disk that may hold a filesystem.

Partitions, a disk without a partition table and linear logical volumes all
come down to this: an offset and a size inside the raw view, which is what a
loop device needs to expose them without device-mapper.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Volume:
    """``size`` bytes at ``offset`` of the raw disk.

    ``source`` says where the range comes from, for people and for logs:
    ``"disk"``, ``"partition 2"`` or ``"lvm vg0/root"``.
    """

    source: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size
