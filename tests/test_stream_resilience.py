"""The SSE stream survives a Redis restart without losing an event."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from h2k.embedded import free_port, start_redis
from h2k.errors import Unavailable
from h2k.states import JobState
from tests.images import make_image


@pytest.fixture
def own_redis(tmp_path: Path):
    port = free_port()
    state = {"process": start_redis(str(tmp_path / "redis"), port=port)[0]}

    def stop() -> None:
        state["process"].kill()
        state["process"].wait()

    def start() -> None:
        state["process"] = start_redis(str(tmp_path / "redis"), port=port)[0]

    yield f"redis://127.0.0.1:{port}/0", stop, start
    state["process"].terminate()
    state["process"].wait()


def test_stream_catches_up_after_redis_restarts(own_redis, settings, images_root):
    from web import create_app

    url, stop, start = own_redis
    app = create_app(
        {
            "H2K_SETTINGS": dataclasses.replace(
                settings, redis_url=url, broker_url=url, result_backend=url
            ),
            "H2K_SSE_KEEPALIVE_SECONDS": 0.5,
        }
    )
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    folder = images_root / "resilience"
    folder.mkdir(exist_ok=True)
    source = make_image(folder, "vmdk", size_mib=1, name="restart")
    job_id = f"restart-{uuid.uuid4().hex[:6]}"
    assert (
        requests.post(
            f"{base}/jobs?queue=false",
            json={
                "job_id": job_id,
                "operation": "convert",
                "image": {"path": source, "format": "vmdk"},
            },
            timeout=10,
        ).status_code
        == 201
    )
    try:
        stream = requests.get(
            f"{base}/jobs/{job_id}/events/stream", stream=True, timeout=30
        )
        lines = stream.iter_lines(decode_unicode=True)
        assert "event:state" in [next(lines) for _ in range(3)]

        # Redis goes away for longer than a keep-alive (the stream looks and
        # finds it gone), comes back with the job (persisted), and the job
        # moves while the hub is still reconnecting.
        stop()
        time.sleep(2)
        start()
        store = app.extensions["h2k"].jobs
        deadline = time.monotonic() + 20
        while True:
            try:
                store.transition(job_id, JobState.CANCELLED, "cancelled in the gap")
                break
            except Unavailable:
                assert time.monotonic() < deadline
                time.sleep(0.2)

        seen = []
        for line in lines:
            seen.append(line)
            if line == "event:complete":
                break
        assert "event:complete" in seen
        assert ": waiting for Redis" in seen
        assert "event:error" not in seen
        assert any("cancelled in the gap" in line for line in seen)
        stream.close()
    finally:
        server.shutdown()
        app.extensions["h2k"].close()
