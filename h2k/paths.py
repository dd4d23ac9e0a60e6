"""Keep image and output paths inside the directories an operator allowed.

A path is resolved (``..`` collapsed, symlinks followed) before it is
compared with the roots, so neither ``..`` nor a symlink leads outside.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from h2k.errors import InvalidInput


def parse_roots(value: str | None) -> tuple[str, ...]:
    """Read ``H2K_ALLOWED_ROOTS``: colon-separated directories."""
    if not value:
        return ()
    return tuple(os.path.realpath(p) for p in value.split(":") if p.strip())


def is_within(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(
        real == root or real.startswith(root.rstrip("/") + "/") for root in roots
    )


def resolve_inside(path: str, roots: Iterable[str], field: str) -> str:
    """Return the real path of ``path``, or raise naming ``field``.

    An empty ``roots`` refuses every path: an installation must say where
    images may be read and written.
    """
    roots = tuple(roots)
    if not os.path.isabs(path):
        raise InvalidInput(
            f"{field} must be an absolute path", {field: ["Must be an absolute path."]}
        )
    if not roots:
        message = "no allowed roots are configured; set H2K_ALLOWED_ROOTS"
        raise InvalidInput(message, {field: [message]})
    real = os.path.realpath(path)
    if not is_within(real, roots):
        message = (
            f"{path} is outside the allowed roots ({':'.join(roots)})"
            if real == os.path.normpath(path)
            else f"{path} resolves to {real}, outside the allowed roots "
            f"({':'.join(roots)})"
        )
        raise InvalidInput(message, {field: [message]})
    return real
