"""Fixtures for end-to-end tests: the API on a real HTTP server, real workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from h2k.embedded import free_port

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="session")
def live_app(settings):
    """The API publishing to the broker the test workers consume."""
    from web import create_app

    return create_app({"H2K_SETTINGS": settings})


@pytest.fixture(scope="session")
def api_url(live_app) -> Iterator[str]:
    port = free_port()
    server = make_server("127.0.0.1", port, live_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


@pytest.fixture(scope="session")
def worker_scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the worker's guest sessions live (TMPDIR) and their ledgers."""
    scratch = tmp_path_factory.mktemp("worker-scratch")
    (scratch / "tmp").mkdir()
    (scratch / "state").mkdir()
    return scratch


@pytest.fixture(scope="session")
def worker(worker_factory, redis_url, worker_scratch):
    import redis

    process = worker_factory(
        "convert-1",
        H2K_RETRY_BACKOFF="1",
        TMPDIR=str(worker_scratch / "tmp"),
        H2K_GUEST_STATE_DIR=str(worker_scratch / "state"),
    )
    process.wait_registered(redis.Redis.from_url(redis_url))
    return process


def wait_for(
    api_url: str,
    job_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    timeout: float = 120,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = requests.get(f"{api_url}/jobs/{job_id}", timeout=10).json()
        if predicate(job):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never got there; last seen: {job}")


def wait_terminal(api_url: str, job_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_for(api_url, job_id, lambda j: j["state"] in TERMINAL, timeout)
