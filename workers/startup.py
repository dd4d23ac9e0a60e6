"""Worker start-up: detect capabilities, choose queues, register, heartbeat.

The queues a worker consumes follow from what its host can really do: a
queue is consumed only when the host holds its capability and every one
below it. ``-Q`` and ``H2K_CAPABILITIES`` may narrow that choice, never
widen it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import threading
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from h2k.capabilities import ORDER, queues_for_worker
from h2k.detect import available, detect_capabilities
from h2k.errors import H2KError
from h2k.guest import cleanup_stale
from h2k.tools.process import kill_all
from workers.runtime import worker_registry

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0

_heartbeat_stop = threading.Event()
_registration: dict[str, Any] = {}


def _system_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "os": platform.system(),
        "kernel": platform.release(),
        "architecture": platform.machine(),
    }
    try:
        info["memory_mb"] = (
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        )
    except (ValueError, OSError):
        pass
    info["disk_space_mb"] = shutil.disk_usage(os.getcwd()).free // 2**20
    return info


def _narrowed(detected: list[str]) -> list[str]:
    wanted = os.environ.get("H2K_CAPABILITIES")
    if not wanted:
        return detected
    allowed = {c.strip() for c in wanted.split(",") if c.strip()}
    return [c for c in detected if c in allowed]


def _clean_up_after_crashes() -> None:
    """Tear down guest-disk sessions (mounts, loops, qemu-nbd) a dead worker left."""
    try:
        cleaned = cleanup_stale()
    except (H2KError, OSError) as exc:
        log.warning("could not clean up stale guest sessions: %s", exc)
        return
    if cleaned:
        log.info("cleaned up %d stale guest session(s): %s", len(cleaned), cleaned)


@celeryd_after_setup.connect
def choose_queues(sender: str, instance: Any, **_: Any) -> None:
    _clean_up_after_crashes()
    reports = detect_capabilities()
    for report in reports.values():
        log.info(
            "capability %s: %s%s",
            report.name,
            "available" if report.available else "unavailable",
            f" ({report.version})" if report.version else f" ({report.detail})",
        )
    held = _narrowed(available(reports))
    permitted = queues_for_worker(held)
    queues = instance.app.amqp.queues
    requested = list(queues.consume_from or queues)
    chosen = [q for q in reversed(ORDER) if q in permitted and q in requested]
    if not chosen:
        raise SystemExit(
            f"h2k worker {sender}: this host can serve none of the queues "
            f"{requested} (capabilities held: {held or 'none'})"
        )
    queues.select(chosen)
    log.info("worker %s consumes %s", sender, ", ".join(chosen))
    _registration.update(
        worker_id=sender,
        capabilities=held,
        system_info={
            **_system_info(),
            "queues": chosen,
            "tool_versions": {r.name: r.version for r in reports.values() if r.version},
        },
        execution_mode=os.environ.get("H2K_EXECUTION_MODE", "HOST"),
    )


def _heartbeat_loop(worker_id: str) -> None:
    while not _heartbeat_stop.wait(HEARTBEAT_SECONDS):
        try:
            worker_registry().heartbeat(worker_id)
        except H2KError as exc:
            log.warning("heartbeat of %s failed: %s", worker_id, exc)
            try:
                worker_registry().register(_registration)
            except H2KError:
                continue


@worker_ready.connect
def register(sender: Any = None, **_: Any) -> None:
    if not _registration:
        return
    worker_registry().register(_registration)
    _heartbeat_stop.clear()
    threading.Thread(
        target=_heartbeat_loop,
        args=(_registration["worker_id"],),
        name="h2k-heartbeat",
        daemon=True,
    ).start()


@worker_shutdown.connect
def unregister(sender: Any = None, **_: Any) -> None:
    _heartbeat_stop.set()
    kill_all()
    if _registration:
        try:
            worker_registry().unregister(_registration["worker_id"])
        except H2KError as exc:
            log.info("unregister of %s: %s", _registration["worker_id"], exc)
