"""The sha256 of an image, as ``image.checksum`` states it.

The rule: the checksum covers every file qemu-img reads to present the
image, in the order :func:`h2k.tools.qemu_img.image_files` lists them, hashed
as one stream. That is the file named by ``image.path`` first, then the
files it names (VMDK extents in descriptor order, a qcow2 data file), then
its backing chain, nearest first. For the usual single-file image (a sparse
or streamOptimized VMDK, a VHD, a VHDX, a VDI, a qcow2 without backing
file) that is simply ``sha256sum`` of the file. For a multi-file VMDK
(descriptor plus extents) it is ``cat disk.vmdk disk-flat.vmdk | sha256sum``:
hashing the descriptor alone would vouch for a few hundred bytes of text and
none of the data, so the extents are covered too.

Hashing runs in h2k's own process, a chunk at a time; between chunks it
reports progress, asks whether the job was cancelled and keeps the time
limit. Stopping and failures are raised as the same errors a tool run
raises (:class:`~h2k.errors.ToolCancelled`, :class:`~h2k.errors.ToolTimeout`,
:class:`~h2k.errors.ToolError`, with ``sha256`` as the tool), so operations
map them onto codes the way they map qemu-img's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Sequence

from h2k.errors import InvalidInput, ToolCancelled, ToolError, ToolTimeout

log = logging.getLogger(__name__)

TOOL = "sha256"
ALGORITHM = "sha256"
# Large enough that reading and hashing dominate the Python overhead, small
# enough that a cancellation is seen within a few milliseconds.
CHUNK_BYTES = 1024 * 1024

_CHECKSUM = re.compile(r"sha256:([0-9a-fA-F]{64})")


def parse(checksum: object, field: str = "image.checksum") -> str:
    """The lowercase hex digest of a ``sha256:HEX`` checksum (any hex case)."""
    match = _CHECKSUM.fullmatch(checksum) if isinstance(checksum, str) else None
    if match is None:
        message = f"{field} must be 'sha256:' followed by 64 hex digits"
        raise InvalidInput(message, {field: [message]})
    return match.group(1).lower()


def sha256_files(
    paths: Sequence[str],
    *,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    timeout: float | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> str:
    """The hex sha256 of ``paths`` read one after another as one stream.

    ``on_progress(bytes_hashed, total_bytes)`` is called after every chunk;
    the total is the files' sizes when hashing starts. ``should_stop`` is
    asked between chunks and ``timeout`` (seconds) is kept the same way.
    """
    args = [TOOL, *paths]
    deadline = None if timeout is None else time.monotonic() + timeout
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    done = 0
    try:
        total = sum(os.stat(path).st_size for path in paths)
        for path in paths:
            with open(path, "rb", buffering=0) as stream:
                _advise_sequential(stream.fileno())
                while True:
                    if should_stop is not None and should_stop():
                        raise ToolCancelled(TOOL, args, None, "stopped: job cancelled")
                    if deadline is not None and time.monotonic() > deadline:
                        raise ToolTimeout(TOOL, args, None, f"stopped after {timeout}s")
                    count = stream.readinto(buffer)
                    if not count:
                        break
                    digest.update(view[:count])
                    done += count
                    if on_progress is not None:
                        on_progress(done, max(total, done))
    except OSError as exc:
        name = exc.filename or "the image"
        message = f"cannot read {name}: {exc.strerror or exc}"
        raise ToolError(TOOL, args, None, message) from exc
    finally:
        view.release()
    log.info("hashed %d bytes of %s", done, list(paths))
    return digest.hexdigest()


def sha256_file(path: str) -> str:
    """The hex sha256 of one file, read whole without progress or limits.

    For what h2k hashes as evidence (an initramfs before and after, a
    probe's copy); an :class:`OSError` comes out as it is.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _advise_sequential(fd: int) -> None:
    # Only a read-ahead hint: a filesystem that refuses it is still hashed.
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        log.debug("posix_fadvise refused on fd %d", fd)
