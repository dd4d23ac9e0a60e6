"""A real worker converts real images; the operator sees every step."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import wait_for, wait_terminal
from tests.images import DRIVERS, make_image

pytestmark = pytest.mark.e2e


def submit(
    api_url: str, job_id: str, source: str, fmt: str = "vmdk", **fields: Any
) -> requests.Response:
    """POST a convert job of ``source``; ``fields`` add to the JobSpec."""
    body = {
        "job_id": job_id,
        "operation": "convert",
        "image": {"path": source, "format": fmt},
        **fields,
    }
    return requests.post(f"{api_url}/jobs", json=body, timeout=30)


@pytest.fixture(scope="module")
def folder(images_root: Path) -> Path:
    path = images_root / "e2e-convert"
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize(
    ("fmt", "output_format", "compress"),
    [
        ("vmdk", "qcow2", False),
        ("vhdx", "qcow2", True),
        ("vdi", "raw", False),
        ("vhd", "qcow2", False),
    ],
)
def test_worker_converts_image_byte_for_byte(
    api_url, worker, folder, fmt, output_format, compress
):
    source = make_image(folder, fmt, size_mib=8, name=f"guest-{fmt}", seed=len(fmt))
    job_id = f"convert-{fmt}-{uuid.uuid4().hex[:6]}"
    response = submit(
        api_url,
        job_id,
        source,
        fmt,
        parameters={"output_format": output_format, "compress": compress},
        audit_info={"requested_by": "e2e@example.com", "tags": ["test"]},
    )
    assert response.status_code == 201, response.text

    job = wait_terminal(api_url, job_id)

    assert job["state"] == "COMPLETED", job
    states = [h["state"] for h in job["state_history"]]
    assert states == [
        "CREATED",
        "VALIDATED",
        "QUEUED",
        "ASSIGNED",
        "RUNNING",
        "COMPLETED",
    ]
    assert job["state_history"][3]["reason"] == f"Assigned to worker {worker.name}"
    assert job["worker_id"] == worker.name
    result = job["result"]
    expected_output = str(Path(source).with_suffix(f".{output_format}"))
    assert result["output_path"] == expected_output
    assert result["output_format"] == output_format
    assert result["verification"]["compare"]["identical"] is True
    assert os.path.getsize(expected_output) == result["output_file_size_bytes"]
    # Independently of h2k: the output holds exactly the source's data.
    subprocess.run(
        [
            "qemu-img",
            "compare",
            "-f",
            DRIVERS[fmt],
            "-F",
            output_format,
            source,
            expected_output,
        ],
        check=True,
        capture_output=True,
    )
    leftovers = [p.name for p in folder.iterdir() if ".part" in p.name]
    assert leftovers == []

    events = requests.get(f"{api_url}/jobs/{job_id}/events", timeout=10).json()
    phases = [e["phase"] for e in events]
    assert phases[0] == "initialization"
    assert "conversion" in phases and "verification" in phases
    conversion = [e for e in events if e["phase"] == "conversion"]
    assert conversion[-1]["percentage"] == 100
    percentages = [e["percentage"] for e in conversion]
    assert percentages == sorted(percentages)
    # vhd rounds its size up to a disk geometry, so compare with the result.
    total = str(result["virtual_size_bytes"])
    assert conversion[-1]["details"]["total_bytes"] == total
    assert conversion[-1]["details"]["bytes_processed"] == total
    assert job["latest_event"] == events[-1]


def test_failure_is_recorded_with_phase_and_code(api_url, worker, folder):
    source = make_image(folder, "vmdk", size_mib=1, name="exists")
    Path(source).with_suffix(".qcow2").write_bytes(b"keep me")
    job_id = f"fail-{uuid.uuid4().hex[:6]}"
    submit(api_url, job_id, source)

    job = wait_terminal(api_url, job_id)

    assert job["state"] == "FAILED"
    assert job["error"]["code"] == "OUTPUT_EXISTS"
    assert job["error"]["phase"] == "validation"
    assert "overwrite" in job["error"]["message"]
    assert job["state_history"][-1]["reason"].startswith("OUTPUT_EXISTS")
    assert Path(source).with_suffix(".qcow2").read_bytes() == b"keep me"


def test_overwrite_replaces_existing_output(api_url, worker, folder):
    source = make_image(folder, "vmdk", size_mib=1, name="replace")
    output = Path(source).with_suffix(".qcow2")
    output.write_bytes(b"old")
    job_id = f"overwrite-{uuid.uuid4().hex[:6]}"
    submit(api_url, job_id, source, parameters={"overwrite": True})
    assert wait_terminal(api_url, job_id)["state"] == "COMPLETED"
    subprocess.run(
        ["qemu-img", "compare", "-f", "vmdk", "-F", "qcow2", source, str(output)],
        check=True,
        capture_output=True,
    )


def _qemu_img_processes(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        except OSError:
            continue
        if "qemu-img" in cmdline and marker in cmdline:
            found.append(pid)
    return found


def test_cancel_running_job_stops_the_tool(api_url, worker, folder):
    source = make_image(folder, "vmdk", size_mib=16, name="cancel-me")
    job_id = f"cancel-{uuid.uuid4().hex[:6]}"
    submit(api_url, job_id, source, parameters={"rate_limit_bytes": 1024 * 1024})
    wait_for(
        api_url,
        job_id,
        lambda j: (j["latest_event"] or {}).get("phase") == "conversion",
    )

    response = requests.delete(f"{api_url}/jobs/{job_id}", timeout=10)
    assert response.status_code == 200

    def tool_gone(_: object) -> bool:
        return not _qemu_img_processes("cancel-me") and not any(
            ".part" in p.name for p in folder.iterdir() if "cancel-me" in p.name
        )

    wait_for(api_url, job_id, tool_gone, timeout=15)
    job = requests.get(f"{api_url}/jobs/{job_id}", timeout=10).json()
    assert job["state"] == "CANCELLED"
    assert [h["state"] for h in job["state_history"]][-2:] == ["RUNNING", "CANCELLED"]
    assert not Path(source).with_suffix(".qcow2").exists()
    assert [
        p.name for p in folder.iterdir() if "cancel-me" in p.name and ".part" in p.name
    ] == []


def test_timeout_fails_the_job_and_cleans_up(api_url, worker, folder):
    source = make_image(folder, "vmdk", size_mib=16, name="too-slow")
    job_id = f"timeout-{uuid.uuid4().hex[:6]}"
    submit(
        api_url,
        job_id,
        source,
        parameters={"rate_limit_bytes": 1024 * 1024},
        execution_policy={"timeout_seconds": 2},
    )

    job = wait_terminal(api_url, job_id, timeout=60)

    assert job["state"] == "FAILED"
    assert job["error"]["code"] == "TIMEOUT"
    assert job["error"]["phase"] == "conversion"
    assert _qemu_img_processes("too-slow") == []
    assert [
        p.name for p in folder.iterdir() if "too-slow" in p.name and ".part" in p.name
    ] == []


def test_metrics_count_terminal_jobs(api_url, worker, folder):
    def completed_converts() -> float:
        text = requests.get(f"{api_url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(
                'hyper2kvm_migration_total{operation="convert",status="completed"}'
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = completed_converts()
    source = make_image(folder, "vdi", size_mib=1, name="counted")
    job_id = f"metrics-{uuid.uuid4().hex[:6]}"
    submit(api_url, job_id, source, "vdi")
    assert wait_terminal(api_url, job_id)["state"] == "COMPLETED"

    assert completed_converts() == before + 1
    text = requests.get(f"{api_url}/metrics", timeout=10).text
    assert 'hyper2kvm_migration_duration_seconds_count{operation="convert"}' in text
    assert "hyper2kvm_worker_jobs_active 0.0" in text
    assert "flask_http_request_total" in text


def test_worker_registered_its_capabilities(api_url, worker):
    listing = requests.get(f"{api_url}/workers", timeout=10).json()
    mine = [w for w in listing["workers"] if w["worker_id"] == worker.name]
    assert mine and mine[0]["active"] is True
    assert "qemu_img" in mine[0]["capabilities"]
    assert mine[0]["system_info"]["tool_versions"]["qemu_img"]
    assert "qemu_img" in mine[0]["system_info"]["queues"]
    assert listing["active"] >= 1
    health = requests.get(f"{api_url}/health", timeout=10).json()
    assert health["workers"] >= 1


def test_retryable_failure_is_retried_then_fails(api_url, worker, folder):
    source = make_image(folder, "vmdk", size_mib=16, name="retried")
    job_id = f"retry-{uuid.uuid4().hex[:6]}"
    submit(
        api_url,
        job_id,
        source,
        parameters={"rate_limit_bytes": 1024 * 1024},
        execution_policy={"timeout_seconds": 2, "retry_count": 1},
    )

    job = wait_terminal(api_url, job_id, timeout=90)

    assert job["state"] == "FAILED"
    assert job["error"]["code"] == "TIMEOUT"
    assert [h["state"] for h in job["state_history"]][3:] == [
        "ASSIGNED",
        "RUNNING",
        "RETRYING",
        "ASSIGNED",
        "RUNNING",
        "FAILED",
    ]
    assert job["attempt"] == 2
