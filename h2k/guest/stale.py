"""Finish the teardown of guest-disk sessions whose worker died.

Run at worker start (and safe to run at any time): a session whose lock
nobody holds has no live owner, so what its ledger lists is torn down, last
created first, up to the first resource that cannot be released. Sessions
that are alive, in this process or another, keep their lock and are left
alone; what fails again stays recorded for the next run.
"""

from __future__ import annotations

import glob
import logging
import os

from h2k.errors import H2KError
from h2k.guest import daemon, ledger, release

log = logging.getLogger(__name__)


def _release_all(path: str) -> bool:
    """Tear down what the ledger at ``path`` lists; whether all of it went."""
    try:
        data = ledger.read(path)
    except FileNotFoundError:
        return True
    except (OSError, ValueError) as exc:
        log.error("cannot read guest ledger %s: %s; left in place", path, exc)
        return False
    remaining = list(data.get("resources", []))
    # Last created first; each rests on the ones before it, so the first
    # failure stops the teardown and the rest waits for the next run.
    while remaining:
        record = remaining[-1]
        try:
            release.release(record)
        except (H2KError, OSError, LookupError, TypeError, ValueError) as exc:
            # A malformed record is kept like one that failed: for a person.
            log.error(
                "stale guest session %s: cannot release %s: %s",
                data.get("session"),
                record,
                exc,
            )
            data["resources"] = remaining
            ledger.write_atomically(path, data)
            return False
        remaining.pop()
    return True


def _unlink(*paths: str) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def cleanup_stale(state_dir: str | None = None) -> list[str]:
    """Tear down every dead session recorded in ``state_dir``.

    Returns the ids of the sessions fully cleaned up. ``state_dir`` defaults
    to ``$H2K_GUEST_STATE_DIR`` or /var/lib/h2k/guest.
    """
    state_dir = ledger.state_dir_or_default(state_dir)
    if not os.path.isdir(state_dir):
        return []
    sessions = {
        os.path.basename(p).rsplit(".", 1)[0]
        for pattern in ("*.json", "*.lock")
        for p in glob.glob(os.path.join(glob.escape(state_dir), pattern))
    }
    cleaned = []
    for session_id in sorted(sessions):
        lock = ledger.lock_path(state_dir, session_id)
        path = ledger.ledger_path(state_dir, session_id)
        fd = ledger.try_lock(lock, create=True)
        if fd is None:
            log.debug("guest session %s is alive; left alone", session_id)
            continue
        try:
            if not os.path.exists(path):
                # Only a lock: the owner died after removing its record.
                _unlink(lock)
                continue
            log.warning("tearing down stale guest session %s", session_id)
            if _release_all(path):
                _unlink(path, f"{path}.tmp", lock)
                cleaned.append(session_id)
        finally:
            os.close(fd)
    daemon.reap_left_behind()
    return cleaned
