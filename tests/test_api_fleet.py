"""Worker registry and queue endpoints through the test client, real Redis."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.images import make_image


def registration(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "worker_id": f"worker-{uuid.uuid4().hex[:8]}",
        "capabilities": ["qemu_img", "nbd_access"],
        "system_info": {"hostname": "node-1", "memory_mb": 16384},
        "execution_mode": "PRIVILEGED_CONTAINER",
    }
    body.update(overrides)
    return body


def error_of(response, code: int) -> dict[str, Any]:
    assert response.status_code == code, response.get_data(as_text=True)
    error: dict[str, Any] = response.get_json()["error"]
    assert error["code"] == code and error["path"] == response.request.path
    return error


def test_register_heartbeat_list_unregister(client):
    body = registration()
    registered = client.post("/workers/register", json=body)
    assert registered.status_code == 201
    assert registered.get_json()["capabilities"] == ["qemu_img", "nbd_access"]
    assert registered.get_json()["message"] == "Worker registered successfully"

    beat = client.post(f"/workers/{body['worker_id']}/heartbeat")
    assert beat.status_code == 200
    assert beat.get_json()["message"] == "Heartbeat received"

    listing = client.get("/workers").get_json()
    mine = [w for w in listing["workers"] if w["worker_id"] == body["worker_id"]]
    assert mine[0]["active"] is True
    assert mine[0]["system_info"]["hostname"] == "node-1"
    assert mine[0]["execution_mode"] == "PRIVILEGED_CONTAINER"
    assert listing["total"] >= 1 and listing["active"] >= 1

    gone = client.delete(f"/workers/{body['worker_id']}")
    assert gone.status_code == 200
    assert gone.get_json()["message"] == "Worker unregistered successfully"
    error_of(client.delete(f"/workers/{body['worker_id']}"), 404)
    error_of(client.post(f"/workers/{body['worker_id']}/heartbeat"), 404)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"worker_id": "bad id"}, "worker_id"),
        ({"capabilities": ["root"]}, "capabilities.0"),
        ({"capabilities": "qemu_img"}, "capabilities"),
        ({"execution_mode": "lower"}, "execution_mode"),
        ({"system_info": {"memory_mb": -1}}, "system_info.memory_mb"),
    ],
)
def test_bad_registration_names_the_field(client, change, field):
    body = registration(**change)
    error = error_of(client.post("/workers/register", json=body), 422)
    assert field in error["fields"]
    assert client.post(f"/workers/{body['worker_id']}/heartbeat").status_code in (
        404,
        422,
    )


def test_dequeue_hands_the_best_job_the_worker_can_run(client, images_root: Path):
    folder = images_root / "dequeue"
    folder.mkdir(exist_ok=True)
    source = make_image(folder, "vmdk", size_mib=1, name="pulled")
    tag = uuid.uuid4().hex[:6]

    def submit(name: str, priority: int, operation: str = "convert") -> str:
        job_id = f"{name}-{tag}"
        response = client.post(
            "/jobs",
            json={
                "job_id": job_id,
                "operation": operation,
                "image": {"path": source, "format": "vmdk"},
                "execution_policy": {"priority": priority},
            },
        )
        assert response.status_code == 201
        return job_id

    # Other tests leave queued jobs behind; take them out of the way first.
    puller = {"worker_id": f"puller-{tag}", "capabilities": ["qemu_img"]}
    while (
        leftover := client.post("/queue/dequeue", json=puller).get_json()
    ) is not None:
        client.delete(f"/jobs/{leftover['job_id']}")
    low = submit("low", 20)
    high = submit("high", 95)
    guest = submit("guest", 99, operation="inspect")

    first = client.post("/queue/dequeue", json=puller)
    assert first.status_code == 200
    assert first.get_json()["job_id"] == high
    job = client.get(f"/jobs/{high}").get_json()
    assert job["state"] == "ASSIGNED"
    assert job["worker_id"] == f"puller-{tag}"
    assert client.post("/queue/dequeue", json=puller).get_json()["job_id"] == low
    for pulled in (high, low):
        client.delete(f"/jobs/{pulled}")
    # The inspect job needs mount_operations: this worker never gets it.
    assert client.post("/queue/dequeue", json=puller).get_json() is None
    assert client.get(f"/jobs/{guest}").get_json()["state"] == "QUEUED"
    error_of(client.post("/queue/dequeue", json={"worker_id": "x"}), 422)
    client.delete(f"/jobs/{guest}")
