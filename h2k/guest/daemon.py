"""Long-running helper processes (qemu-nbd, nbdfuse) that h2k starts and stops.

:func:`h2k.tools.process.run_tool` waits for its tool to finish, which a
server never does, so the guest layer starts its servers here: an argument
list, never a shell, in a session of their own so that no terminal signal
meant for the worker reaches them, with their output in a log file whose
tail explains a failed start. Stopping a recorded process by pid checks its
identity first (:mod:`h2k.guest.procinfo`).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from h2k.errors import ToolCancelled, ToolError, ToolTimeout
from h2k.guest import procinfo

log = logging.getLogger(__name__)

TERMINATE_GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05
LOG_TAIL_BYTES = 4096

# Servers whose session could not stop them (its teardown stopped at a busy
# resource) stay referenced here, so that once crash recovery ends them they
# are reaped rather than left as zombies of the worker.
_left_behind: list[Daemon] = []
_left_behind_lock = threading.Lock()


def _limit_child() -> None:
    # No core dumps of servers that hold guest data.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def wait_gone(record: Mapping[str, Any], grace: float) -> bool:
    """Whether the recorded process exits (or is gone) within ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not procinfo.matches(record):
            return True
        time.sleep(POLL_SECONDS)
    return not procinfo.matches(record)


def stop_recorded(
    record: Mapping[str, Any], grace: float = TERMINATE_GRACE_SECONDS
) -> None:
    """Stop the process ``record`` names, if it is still that process.

    SIGTERM first so that qemu-nbd flushes and nbdfuse unmounts, SIGKILL
    after ``grace`` seconds. A pid that now belongs to another process is
    left alone; one that survives SIGKILL (stuck in the kernel) raises
    :class:`ToolError`.
    """
    if not procinfo.matches(record):
        log.debug("process %s is gone or is another process now", record.get("pid"))
        return
    pid = int(str(record["pid"]))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(record, grace):
            return
    argv = [str(a) for a in record.get("argv") or []]
    raise ToolError(
        os.path.basename(argv[0]) if argv else str(pid),
        argv,
        None,
        f"process {pid} did not exit after SIGKILL",
    )


def leave_behind(server: Daemon) -> None:
    """Keep ``server`` to be reaped later; its ledger record will stop it."""
    with _left_behind_lock:
        _left_behind.append(server)


def reap_left_behind() -> None:
    """Reap the servers left behind that have exited since."""
    with _left_behind_lock:
        _left_behind[:] = [s for s in _left_behind if s.returncode is None]


class Daemon:
    """A server process this worker started; ``stop`` ends it and reaps it."""

    def __init__(self, argv: Sequence[str], *, cwd: str, log_path: str):
        self.argv = [str(a) for a in argv]
        self.tool = os.path.basename(self.argv[0])
        self.log_path = log_path
        env = dict(os.environ)
        env.setdefault("LC_ALL", "C")
        reap_left_behind()
        log.debug("starting %s", self.argv)
        with open(log_path, "ab") as log_file:
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_limit_child,
                )
            except OSError as exc:
                raise ToolError(self.tool, self.argv, None, str(exc)) from exc
        self.pid = self._proc.pid
        # Popen returns once the exec succeeded, so /proc already shows the
        # server's command line next to the start time set at fork.
        identity = procinfo.identify(self.pid)
        self.start = identity.start if identity is not None else 0

    def record(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "argv": list(self.argv)}

    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll()

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(0, os.SEEK_END)
                size = log_file.tell()
                log_file.seek(max(0, size - LOG_TAIL_BYTES))
                return log_file.read().decode("utf-8", errors="replace").strip()
        except OSError:
            return ""

    def failure(self, what: str) -> ToolError:
        """The error that says the server exited or never became ready."""
        tail = self.log_tail() or what
        return ToolError(self.tool, self.argv, self.returncode, tail)

    def wait_until(
        self,
        ready: Callable[[], bool],
        *,
        timeout: float,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        """Poll ``ready`` until it answers true; fail when the server exits.

        Raises :class:`ToolError` with the server's last output when it
        exits first, :class:`ToolTimeout` past ``timeout``, and
        :class:`ToolCancelled` when ``should_stop`` answers true.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise self.failure(f"{self.tool} exited before it was ready")
            if ready():
                return
            if should_stop is not None and should_stop():
                raise ToolCancelled(
                    self.tool, self.argv, None, "stopped: job cancelled"
                )
            if time.monotonic() > deadline:
                raise ToolTimeout(
                    self.tool, self.argv, None, f"not ready after {timeout}s"
                )
            time.sleep(POLL_SECONDS)

    def stop(self, grace: float = TERMINATE_GRACE_SECONDS) -> None:
        """End the server's process group and reap it.

        SIGTERM first so that qemu-nbd flushes, SIGKILL after ``grace``.
        """
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self._proc.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        if self._proc.poll() is None:
            log.warning("%s (pid %s) did not exit after SIGKILL", self.tool, self.pid)

    def exit_gracefully(self, grace: float = TERMINATE_GRACE_SECONDS) -> bool:
        """Wait up to ``grace`` seconds for the server to exit on its own."""
        try:
            self._proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return False
        return True
