"""Priority ordering on a busy worker; SSE resumption without gaps or repeats."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import wait_for, wait_terminal
from tests.images import make_image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def folder(images_root: Path) -> Path:
    path = images_root / "e2e-order"
    path.mkdir(exist_ok=True)
    return path


def _started_at(job: dict[str, Any]) -> str:
    return next(h["timestamp"] for h in job["state_history"] if h["state"] == "RUNNING")


def test_later_high_priority_job_overtakes_earlier_low_one(api_url, worker, folder):
    blocker = make_image(folder, "vmdk", size_mib=16, name="blocker")
    low_src = make_image(folder, "vmdk", size_mib=1, name="low")
    high_src = make_image(folder, "vmdk", size_mib=1, name="high")
    tag = uuid.uuid4().hex[:6]

    def submit(name: str, path: str, priority: int, **params: Any) -> str:
        job_id = f"{name}-{tag}"
        response = requests.post(
            f"{api_url}/jobs",
            json={
                "job_id": job_id,
                "operation": "convert",
                "image": {"path": path, "format": "vmdk"},
                "parameters": params,
                "execution_policy": {"priority": priority},
            },
            timeout=30,
        )
        assert response.status_code == 201, response.text
        return job_id

    busy = submit("blocker", blocker, 50, rate_limit_bytes=2 * 1024 * 1024)
    wait_for(api_url, busy, lambda j: j["state"] == "RUNNING")
    low = submit("low", low_src, 10)
    high = submit("high", high_src, 90)
    queue = requests.get(f"{api_url}/queue", timeout=10).json()
    assert queue["by_priority"]["10"] >= 1 and queue["by_priority"]["90"] >= 1

    jobs = {job_id: wait_terminal(api_url, job_id) for job_id in (busy, low, high)}

    assert all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    assert _started_at(jobs[busy]) < _started_at(jobs[high]) < _started_at(jobs[low])


def _read_events(response: requests.Response, stop_after: int | None = None):
    """Parse an SSE body into (id, type, data) until complete or stop_after."""
    events: list[tuple[str | None, str, Any]] = []
    fields: dict[str, str] = {}
    for raw in response.iter_lines(decode_unicode=True):
        if raw is None:
            continue
        if raw == "":
            if "data" in fields:
                events.append(
                    (
                        fields.get("id"),
                        fields.get("event", "message"),
                        json.loads(fields["data"]),
                    )
                )
                if events[-1][1] == "complete":
                    break
                if (
                    stop_after is not None
                    and sum(1 for e in events if e[1] == "progress") >= stop_after
                ):
                    break
            fields = {}
            continue
        if raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value
    response.close()
    return events


def test_reconnect_with_last_event_id_gets_every_event_once(
    api_url, worker, folder, redis_client
):
    source = make_image(folder, "vmdk", size_mib=16, name="streamed")
    job_id = f"stream-{uuid.uuid4().hex[:6]}"
    requests.post(
        f"{api_url}/jobs",
        json={
            "job_id": job_id,
            "operation": "convert",
            "image": {"path": source, "format": "vmdk"},
            "parameters": {"rate_limit_bytes": 2 * 1024 * 1024},
        },
        timeout=30,
    )
    url = f"{api_url}/jobs/{job_id}/events/stream"

    first = _read_events(requests.get(url, stream=True, timeout=60), stop_after=3)
    assert first[-1][1] == "progress"
    last_id = first[-1][0]
    assert last_id
    second = _read_events(
        requests.get(url, headers={"Last-Event-ID": last_id}, stream=True, timeout=120)
    )

    assert second[-1] == (None, "complete", {"state": "COMPLETED"})
    received = [e[0] for e in first + second if e[1] != "complete"]
    stored = [
        entry_id for entry_id, _ in redis_client.xrange(f"h2k:job:{job_id}:events")
    ]
    assert received == stored
    assert len(set(received)) == len(received)
    kinds = {e[1] for e in first + second}
    assert {"state", "progress", "complete"} <= kinds
    assert wait_terminal(api_url, job_id)["state"] == "COMPLETED"


def test_stream_of_finished_job_replays_and_completes_at_once(api_url, worker, folder):
    source = make_image(folder, "vdi", size_mib=1, name="done")
    job_id = f"done-{uuid.uuid4().hex[:6]}"
    requests.post(
        f"{api_url}/jobs",
        json={
            "job_id": job_id,
            "operation": "convert",
            "image": {"path": source, "format": "vdi"},
        },
        timeout=30,
    )
    wait_terminal(api_url, job_id)

    events = _read_events(
        requests.get(f"{api_url}/jobs/{job_id}/events/stream", stream=True, timeout=30)
    )
    assert events[0][1] == "state" and events[0][2]["state"] == "CREATED"
    assert events[-1] == (None, "complete", {"state": "COMPLETED"})

    # Resuming after the last real event sends only the completion.
    last_id = events[-2][0]
    tail = _read_events(
        requests.get(
            f"{api_url}/jobs/{job_id}/events/stream?since={last_id}",
            stream=True,
            timeout=30,
        )
    )
    assert tail == [(None, "complete", {"state": "COMPLETED"})]
