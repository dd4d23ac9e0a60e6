"""Job endpoints through the Flask test client, against a real Redis.

No worker runs here: submitted jobs stay QUEUED (the broker is the tests'
own Redis), which is what these tests look at.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.images import make_image


def new_id(prefix: str = "job") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def vmdk(images_root: Path) -> str:
    folder = images_root / "api"
    folder.mkdir(exist_ok=True)
    return make_image(folder, "vmdk", size_mib=4, name="api-source")


def spec(path: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "job_id": new_id(),
        "operation": "convert",
        "image": {"path": path, "format": "vmdk"},
        "parameters": {"output_format": "qcow2"},
    }
    body.update(overrides)
    return body


def assert_envelope(response, code: int) -> dict[str, Any]:
    assert response.status_code == code, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["path"] == response.request.path
    assert error["timestamp"].endswith("Z")
    return error


def test_submit_queues_job_and_records_history(client, vmdk):
    body = spec(vmdk, execution_policy={"priority": 75})
    response = client.post("/jobs", json=body)

    assert response.status_code == 201
    assert response.get_json()["state"] == "QUEUED"
    assert response.get_json()["queue_position"] >= 1
    job = client.get(f"/jobs/{body['job_id']}").get_json()
    assert job["state"] == "QUEUED"
    assert [h["state"] for h in job["state_history"]] == [
        "CREATED",
        "VALIDATED",
        "QUEUED",
    ]
    assert job["state_history"][2]["reason"] == "Added to queue with priority 75"
    assert job["spec"]["execution_policy"]["priority"] == 75
    assert job["spec"]["execution_policy"]["idempotent"] is True
    assert job["result"] is None and job["latest_event"] is None


def test_job_id_is_generated_when_missing(client, vmdk):
    body = spec(vmdk)
    del body["job_id"]
    response = client.post("/jobs", json=body)
    assert response.status_code == 201
    job_id = response.get_json()["job_id"]
    assert uuid.UUID(job_id)
    assert client.get(f"/jobs/{job_id}").status_code == 200


def test_same_spec_twice_returns_the_existing_job(client, vmdk):
    body = spec(vmdk)
    first = client.post("/jobs", json=body)
    again = client.post("/jobs", json=body)
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.get_json()["job_id"] == body["job_id"]
    history = client.get(f"/jobs/{body['job_id']}").get_json()["state_history"]
    assert len(history) == 3


def test_same_id_with_another_spec_conflicts(client, vmdk):
    body = spec(vmdk)
    client.post("/jobs", json=body)
    other = {**body, "parameters": {"output_format": "raw"}}
    error = assert_envelope(client.post("/jobs", json=other), 409)
    assert body["job_id"] in error["message"]
    stored = client.get(f"/jobs/{body['job_id']}").get_json()
    assert stored["spec"]["parameters"]["output_format"] == "qcow2"


def test_queue_false_stores_validated_until_queued(client, vmdk):
    body = spec(vmdk)
    response = client.post("/jobs?queue=false", json=body)
    assert response.status_code == 201
    assert response.get_json()["state"] == "VALIDATED"
    queued = client.post(f"/jobs/{body['job_id']}/queue")
    assert queued.status_code == 200
    assert queued.get_json()["state"] == "QUEUED"
    assert_envelope(client.post(f"/jobs/{body['job_id']}/queue"), 400)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"operation": "teleport"}, "operation"),
        ({"image": {"path": "/x", "format": "vmdx"}}, "image.format"),
        ({"image": {"format": "vmdk"}}, "image.path"),
        ({"execution_policy": {"priority": 101}}, "execution_policy.priority"),
        ({"execution_policy": {"priority": -1}}, "execution_policy.priority"),
        (
            {"execution_policy": {"timeout_seconds": 0}},
            "execution_policy.timeout_seconds",
        ),
        ({"execution_policy": {"retry_count": "3"}}, "execution_policy.retry_count"),
        ({"parameters": {"output_format": "vmdk"}}, "parameters.output_format"),
        ({"parameters": {"compres": True}}, "parameters.compres"),
        (
            {"parameters": {"compress": True, "output_format": "raw"}},
            "parameters.compress",
        ),
        ({"job_id": "has space"}, "job_id"),
        ({"job_id": "x" * 129}, "job_id"),
        ({"job_id": "trailing-newline\n"}, "job_id"),
        ({"audit_info": {"tags": "prod"}}, "audit_info.tags"),
        (
            {"image": {"path": "/x", "format": "vmdk", "checksum": "md5:00"}},
            "image.checksum",
        ),
        ({"capability_requirements": ["root"]}, "capability_requirements.0"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_spec_names_the_field_and_stores_nothing(
    client, redis_client, vmdk, change, field
):
    body = {**spec(vmdk), **change}
    before = redis_client.zcard("h2k:jobs")
    error = assert_envelope(client.post("/jobs", json=body), 422)
    assert field in error["fields"], error
    assert field in error["message"]
    assert redis_client.zcard("h2k:jobs") == before


@pytest.mark.parametrize(
    ("operation", "parameters", "field"),
    [
        ("inspect", {"dry_run": True}, "parameters.dry_run"),
        ("offline_fix", {"fixes": ["reboot"]}, "parameters.fixes.0"),
        ("offline_fix", {"fixes": []}, "parameters.fixes"),
        (
            "boot_repair",
            {"in_place": True, "output_path": "/x.qcow2"},
            "parameters.output_path",
        ),
        ("fs_repair", {"filesystems": "root"}, "parameters.filesystems"),
        ("initramfs_regenerate", {"kernels": ["../../etc"]}, "parameters.kernels.0"),
        ("lvm_repair", {"compress": True}, "parameters.compress"),
    ],
)
def test_parameters_are_checked_per_operation(
    client, vmdk, operation, parameters, field
):
    body = spec(vmdk, operation=operation, parameters=parameters)
    error = assert_envelope(client.post("/jobs", json=body), 422)
    assert field in error["fields"], error


@pytest.mark.parametrize(
    ("operation", "queue"),
    [
        ("inspect", "mount_operations"),
        ("offline_fix", "mount_operations"),
        ("selinux_prep", "mount_operations"),
        ("lvm_repair", "lvm_tools"),
    ],
)
def test_guest_operations_go_to_their_capability_queue(client, vmdk, operation, queue):
    body = spec(vmdk, operation=operation, parameters={})
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.get_data(as_text=True)
    job = client.get(f"/jobs/{body['job_id']}").get_json()
    assert job["queue"] == queue
    assert job["spec"]["execution_policy"]["idempotent"] is (operation == "inspect")
    client.delete(f"/jobs/{body['job_id']}")


@pytest.mark.parametrize(
    "body",
    ["{not json", "[1, 2]", "null", '"a string"'],
)
def test_body_that_is_not_a_job_object(client, body):
    response = client.post("/jobs", data=body, content_type="application/json")
    assert response.status_code in (400, 422)
    assert_envelope(response, response.status_code)


def test_malformed_json_says_so(client):
    error = assert_envelope(
        client.post("/jobs", data="{bad", content_type="application/json"), 400
    )
    assert "not valid JSON" in error["message"]


def test_body_too_large(client):
    big = '{"x": "' + "a" * (2 * 1024 * 1024) + '"}'
    assert_envelope(
        client.post("/jobs", data=big, content_type="application/json"), 413
    )


def test_path_outside_roots_is_refused(client, redis_client):
    before = redis_client.zcard("h2k:jobs")
    error = assert_envelope(client.post("/jobs", json=spec("/etc/hostname")), 422)
    assert "outside the allowed roots" in error["fields"]["image.path"][0]
    assert redis_client.zcard("h2k:jobs") == before


def test_dotdot_escape_is_refused(client, images_root, vmdk):
    sneaky = f"{images_root}/../../etc/hostname"
    error = assert_envelope(client.post("/jobs", json=spec(sneaky)), 422)
    assert "outside the allowed roots" in error["fields"]["image.path"][0]


def test_symlink_escape_is_refused(client, images_root):
    link = images_root / "api" / "escape.vmdk"
    if not link.exists():
        os.symlink("/etc/hostname", link)
    error = assert_envelope(client.post("/jobs", json=spec(str(link))), 422)
    assert "resolves to /etc/hostname" in error["fields"]["image.path"][0]


def test_missing_image_is_refused(client, images_root):
    error = assert_envelope(
        client.post("/jobs", json=spec(f"{images_root}/api/none.vmdk")), 422
    )
    assert "does not exist" in error["message"]


def test_output_path_outside_roots_is_refused(client, vmdk):
    body = spec(vmdk, parameters={"output_path": "/tmp/out.qcow2"})
    error = assert_envelope(client.post("/jobs", json=body), 422)
    assert "parameters.output_path" in error["fields"]


def test_output_path_equal_to_input_is_refused(client, images_root):
    folder = images_root / "api"
    qcow2 = make_image(folder, "qcow2", size_mib=1, name="same")
    body = spec(
        qcow2,
        image={"path": qcow2, "format": "qcow2"},
        parameters={"output_path": qcow2},
    )
    error = assert_envelope(client.post("/jobs", json=body), 422)
    assert "parameters.output_path" in error["fields"]


def test_declared_format_must_match_the_image(client, images_root, redis_client):
    qcow2 = make_image(images_root / "api", "qcow2", size_mib=1, name="really-qcow2")
    before = redis_client.zcard("h2k:jobs")
    body = spec(qcow2, image={"path": qcow2, "format": "vmdk"})
    error = assert_envelope(client.post("/jobs", json=body), 422)
    assert "qcow2" in error["fields"]["image.format"][0]
    assert redis_client.zcard("h2k:jobs") == before


def test_unknown_job_is_404(client):
    error = assert_envelope(client.get("/jobs/no-such-job"), 404)
    assert error["message"] == "Job no-such-job not found"
    assert_envelope(client.delete("/jobs/no-such-job"), 404)
    assert_envelope(client.get("/jobs/no-such-job/events"), 404)
    assert_envelope(client.get("/jobs/no-such-job/events/stream"), 404)


def test_unknown_path_and_wrong_method(client):
    assert_envelope(client.get("/no/such/path"), 404)
    error = assert_envelope(client.put("/jobs"), 405)
    assert "PUT" in error["message"]


def test_cancel_queued_job_then_cancel_again_is_400(client, vmdk):
    body = spec(vmdk)
    client.post("/jobs", json=body)
    response = client.delete(f"/jobs/{body['job_id']}")
    assert response.status_code == 200
    assert response.get_json() == {
        "job_id": body["job_id"],
        "state": "CANCELLED",
        "message": "Job cancelled successfully",
    }
    error = assert_envelope(client.delete(f"/jobs/{body['job_id']}"), 400)
    assert error["message"] == (
        f"Job {body['job_id']} is already in terminal state CANCELLED"
    )
    history = client.get(f"/jobs/{body['job_id']}").get_json()["state_history"]
    assert history[-1]["state"] == "CANCELLED"


def test_list_newest_first_with_filter_and_cursor(client, vmdk):
    ids = []
    for _ in range(5):
        body = spec(vmdk)
        ids.append(body["job_id"])
        client.post("/jobs?queue=false", json=body)
    page = client.get("/jobs?limit=3").get_json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1][:3]
    assert page["total"] >= 5
    assert page["jobs"][0]["is_terminal"] is False
    rest = client.get(f"/jobs?limit=2&cursor={page['next_cursor']}").get_json()
    assert [j["job_id"] for j in rest["jobs"]] == ids[::-1][3:5]

    validated = client.get("/jobs?state=VALIDATED&limit=1000").get_json()
    assert {j["state"] for j in validated["jobs"]} == {"VALIDATED"}
    assert set(ids) <= {j["job_id"] for j in validated["jobs"]}
    assert_envelope(client.get("/jobs?state=SLEEPING"), 422)
    assert_envelope(client.get("/jobs?limit=1001"), 422)


def test_events_since_must_have_a_zone(client, vmdk):
    body = spec(vmdk)
    client.post("/jobs?queue=false", json=body)
    assert client.get(f"/jobs/{body['job_id']}/events").get_json() == []
    error = assert_envelope(
        client.get(f"/jobs/{body['job_id']}/events?since=2026-01-01T00:00:00"), 422
    )
    assert "since" in error["fields"]
    ok = client.get(f"/jobs/{body['job_id']}/events?since=2026-01-01T00:00:00Z")
    assert ok.status_code == 200


def test_queue_status_counts_queued_jobs_by_priority(client, vmdk):
    before = client.get("/queue").get_json()
    body = spec(vmdk, execution_policy={"priority": 13})
    client.post("/jobs", json=body)
    after = client.get("/queue").get_json()
    assert after["total_jobs"] == before["total_jobs"] + 1
    assert after["by_priority"]["13"] == before["by_priority"].get("13", 0) + 1
    assert after["by_queue"]["qemu_img"] == before["by_queue"]["qemu_img"] + 1
    client.delete(f"/jobs/{body['job_id']}")
    assert client.get("/queue").get_json()["by_priority"].get("13", 0) == (
        before["by_priority"].get("13", 0)
    )


def test_higher_priority_gets_earlier_queue_position(client, vmdk):
    low = client.post("/jobs", json=spec(vmdk, execution_policy={"priority": 1}))
    high = client.post("/jobs", json=spec(vmdk, execution_policy={"priority": 99}))
    assert high.get_json()["queue_position"] < low.get_json()["queue_position"]
