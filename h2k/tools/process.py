"""Run external tools: argument lists, never a shell, each in its own group.

Every tool h2k starts goes through :func:`run_tool`. The child runs in a new
session so that stopping it stops everything it started; the caller can ask
for it to stop (cancellation) or give it a deadline, and whatever happens in
the caller (an exception, a Celery soft time limit) the group is killed on the
way out. :func:`kill_all` stops every group still running in this process,
for worker shutdown.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from h2k.errors import ToolCancelled, ToolError, ToolTimeout

log = logging.getLogger(__name__)

# How long a tool gets to exit after SIGTERM before SIGKILL.
TERMINATE_GRACE_SECONDS = 5.0
# How often the stop condition is polled while the tool runs.
POLL_SECONDS = 0.25

_LINE_BREAK = re.compile(r"[\r\n]")
_running: set[int] = set()
_running_lock = threading.Lock()


@dataclass(frozen=True)
class ToolResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def _limit_child() -> None:
    # No core dumps of tools that read guest data.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _stop_group(
    pgid: int,
    grace: float = TERMINATE_GRACE_SECONDS,
    leader: subprocess.Popen[bytes] | None = None,
) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if leader is not None:
            # Reap the leader, or its zombie keeps the group alive.
            leader.poll()
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_all() -> None:
    """Stop every tool group this process started and that still runs."""
    with _running_lock:
        groups = list(_running)
    for pgid in groups:
        _stop_group(pgid, grace=1.0)


def run_tool(
    args: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    timeout: float | None = None,
    check: bool = True,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> ToolResult:
    """Run ``args`` and return its output.

    ``on_line`` receives each line of standard output as it arrives; a
    carriage return ends a line too, so progress counters that redraw one
    line are seen at every redraw. ``should_stop`` is polled while the tool
    runs; when it answers true the group is stopped and :class:`ToolCancelled`
    raised. Past ``timeout`` seconds the group is stopped and
    :class:`ToolTimeout` raised. With ``check`` a non-zero exit raises
    :class:`ToolError`.
    """
    argv = [str(a) for a in args]
    tool = os.path.basename(argv[0])
    log.debug("running %s", argv)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("LC_ALL", "C")

    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_env,
            start_new_session=True,
            preexec_fn=_limit_child,
        )
    except OSError as exc:
        raise ToolError(tool, argv, None, str(exc)) from exc

    pgid = proc.pid
    with _running_lock:
        _running.add(pgid)
    out_chunks: list[str] = []
    err_chunks: list[str] = []
    pending = ""
    stopped_for: type[ToolError] | None = None
    deadline = None if timeout is None else time.monotonic() + timeout
    selector = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    selector.register(proc.stdout, selectors.EVENT_READ, "out")
    selector.register(proc.stderr, selectors.EVENT_READ, "err")

    try:
        open_streams = 2
        while open_streams:
            for key, _ in selector.select(timeout=POLL_SECONDS):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                text = data.decode("utf-8", errors="replace")
                if key.data == "err":
                    err_chunks.append(text)
                    continue
                out_chunks.append(text)
                if on_line is not None:
                    pending += text
                    *lines, pending = _LINE_BREAK.split(pending)
                    for line in lines:
                        if line.strip():
                            on_line(line)
            if should_stop is not None and should_stop():
                stopped_for = ToolCancelled
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped_for = ToolTimeout
                break
        if stopped_for is None:
            if on_line is not None and pending.strip():
                on_line(pending)
            proc.wait()
    finally:
        selector.close()
        if proc.poll() is None or stopped_for is not None:
            _stop_group(pgid, leader=proc)
            proc.wait()
        else:
            # The leader is gone; stop anything it left in its group.
            _stop_group(pgid, grace=0.5)
        proc.stdout.close()
        proc.stderr.close()
        with _running_lock:
            _running.discard(pgid)

    stdout = "".join(out_chunks)
    stderr = "".join(err_chunks)
    if stopped_for is ToolCancelled:
        raise ToolCancelled(tool, argv, proc.returncode, "stopped: job cancelled")
    if stopped_for is ToolTimeout:
        raise ToolTimeout(tool, argv, proc.returncode, f"stopped after {timeout}s")
    if check and proc.returncode != 0:
        raise ToolError(tool, argv, proc.returncode, stderr or stdout)
    return ToolResult(argv, proc.returncode, stdout, stderr)
