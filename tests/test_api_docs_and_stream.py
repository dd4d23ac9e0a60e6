"""OpenAPI and docs pages; SSE keep-alives and the shared subscription."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from h2k.embedded import free_port
from tests.images import make_image


def test_openapi_document_describes_every_endpoint(client):
    document = client.get("/openapi.json").get_json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for path, methods in {
        "/jobs": {"get", "post"},
        "/jobs/{job_id}": {"get", "delete"},
        "/jobs/{job_id}/events": {"get"},
        "/jobs/{job_id}/events/stream": {"get"},
        "/workers/register": {"post"},
        "/workers/{worker_id}/heartbeat": {"post"},
        "/workers": {"get"},
        "/workers/{worker_id}": {"delete"},
        "/queue": {"get"},
        "/queue/dequeue": {"post"},
        "/health": {"get"},
        "/metrics": {"get"},
    }.items():
        assert methods <= set(paths[path]), path
    schemas = document["components"]["schemas"]
    assert "JobSpec" in schemas and "ErrorEnvelope" in schemas
    body = paths["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/JobSpec")
    assert "409" in paths["/jobs"]["post"]["responses"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_serve_html(client, page):
    response = client.get(page)
    assert response.status_code == 200
    assert "openapi.json" in response.get_data(as_text=True)


@pytest.fixture(scope="module")
def quiet_server(settings):
    from web import create_app

    app = create_app({"H2K_SETTINGS": settings, "H2K_SSE_KEEPALIVE_SECONDS": 0.2})
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def _queued_job(base: str, images_root: Path) -> str:
    folder = images_root / "stream-api"
    folder.mkdir(exist_ok=True)
    source = make_image(folder, "vmdk", size_mib=1, name=f"s{uuid.uuid4().hex[:6]}")
    job_id = f"quiet-{uuid.uuid4().hex[:8]}"
    response = requests.post(
        f"{base}/jobs?queue=false",
        json={
            "job_id": job_id,
            "operation": "convert",
            "image": {"path": source, "format": "vmdk"},
        },
        timeout=10,
    )
    assert response.status_code == 201
    return job_id


def test_idle_stream_sends_keep_alive_comments(quiet_server, images_root):
    job_id = _queued_job(quiet_server, images_root)
    with requests.get(
        f"{quiet_server}/jobs/{job_id}/events/stream", stream=True, timeout=10
    ) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        lines = []
        for line in response.iter_lines(decode_unicode=True):
            lines.append(line)
            if line == ": keep-alive":
                break
    assert "event:state" in lines
    assert lines[-1] == ": keep-alive"


def test_clients_of_one_process_share_one_subscription(
    quiet_server, images_root, redis_client
):
    job_ids = [_queued_job(quiet_server, images_root) for _ in range(3)]
    streams = []
    lines = []

    def open_stream(job_id: str) -> None:
        stream = requests.get(
            f"{quiet_server}/jobs/{job_id}/events/stream", stream=True, timeout=10
        )
        streams.append(stream)
        lines.append(stream.iter_lines(decode_unicode=True))
        next(lines[-1])

    open_stream(job_ids[0])
    patterns = redis_client.execute_command("PUBSUB", "NUMPAT")
    for job_id in job_ids:
        open_stream(job_id)
    try:
        assert redis_client.execute_command("PUBSUB", "NUMPAT") == patterns
        # A cancel reaches every watcher of that job through the one subscription.
        requests.delete(f"{quiet_server}/jobs/{job_ids[0]}", timeout=10)
        for watcher in (lines[0], lines[1]):
            seen = []
            for line in watcher:
                seen.append(line)
                if line == "event:complete":
                    break
            assert "event:complete" in seen
    finally:
        for stream in streams:
            stream.close()


def test_stream_rejects_a_bad_resume_point(client, images_root):
    folder = images_root / "stream-api"
    folder.mkdir(exist_ok=True)
    source = make_image(folder, "vmdk", size_mib=1, name="bad-since")
    job_id = f"since-{uuid.uuid4().hex[:8]}"
    client.post(
        "/jobs?queue=false",
        json={
            "job_id": job_id,
            "operation": "convert",
            "image": {"path": source, "format": "vmdk"},
        },
    )
    response = client.get(f"/jobs/{job_id}/events/stream?since=yesterday")
    assert response.status_code == 422
    assert "since" in response.get_json()["error"]["fields"]
