"""Redis or the broker unreachable: 503 in the envelope, no job lost."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from h2k.config import Settings
from h2k.embedded import free_port
from tests.images import make_image


@pytest.fixture(scope="module")
def image(images_root: Path) -> str:
    folder = images_root / "unavailable"
    folder.mkdir(exist_ok=True)
    return make_image(folder, "vmdk", size_mib=1, name="src")


def _app(settings: Settings):
    from web import create_app

    return create_app({"TESTING": True, "H2K_SETTINGS": settings})


def test_redis_down_answers_503(settings, image):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = _app(
        dataclasses.replace(settings, redis_url=dead, broker_url=dead)
    ).test_client()
    for response in (
        client.get("/health"),
        client.get("/jobs"),
        client.get("/jobs/x"),
        client.get("/metrics"),
        client.post(
            "/jobs",
            json={
                "operation": "convert",
                "image": {"path": image, "format": "vmdk"},
            },
        ),
    ):
        assert response.status_code == 503, response.get_data(as_text=True)
        error = response.get_json()["error"]
        assert error["code"] == 503
        assert "Redis is unreachable" in error["message"]


def test_broker_down_keeps_the_job_validated(settings, image, client):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    down = _app(dataclasses.replace(settings, broker_url=dead)).test_client()
    job_id = f"broker-{uuid.uuid4().hex[:8]}"
    body = {
        "job_id": job_id,
        "operation": "convert",
        "image": {"path": image, "format": "vmdk"},
    }

    response = down.post("/jobs", json=body)
    assert response.status_code == 503
    assert "broker is unreachable" in response.get_json()["error"]["message"]
    job = client.get(f"/jobs/{job_id}").get_json()
    assert job["state"] == "VALIDATED"
    assert [h["state"] for h in job["state_history"]] == [
        "CREATED",
        "VALIDATED",
        "QUEUED",
        "VALIDATED",
    ]
    assert "broker unreachable" in job["state_history"][-1]["reason"]

    # Submitting the same job once the broker is back queues it.
    again = client.post("/jobs", json=body)
    assert again.status_code == 200
    assert again.get_json()["state"] == "QUEUED"


def test_unexpected_error_is_500_in_the_envelope(settings):
    from web import create_app

    app = create_app({"H2K_SETTINGS": settings})

    @app.route("/boom")
    def boom() -> str:
        raise RuntimeError("the disk caught fire")

    response = app.test_client().get("/boom")
    assert response.status_code == 500
    error = response.get_json()["error"]
    assert error["code"] == 500
    assert error["path"] == "/boom"
    # The cause is logged, not shown to the client.
    assert "fire" not in error["message"]
