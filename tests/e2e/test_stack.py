"""``h2k up`` as an operator runs it: embedded Redis, gunicorn, workers, Flower."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from h2k.embedded import free_port
from tests.e2e.conftest import wait_terminal
from tests.images import make_image

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _wait_http(
    url: str, stack: subprocess.Popen[bytes], timeout: float = 90
) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert stack.poll() is None, f"h2k up exited with {stack.returncode}"
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except requests.RequestException:
            # Not listening yet, or its processes are still starting.
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def test_h2k_up_runs_the_whole_stack(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    port, flower_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")
    }
    env.update(
        H2K_ALLOWED_ROOTS=str(images),
        H2K_API_PROCESSES="3",
        FLOWER_UNAUTHENTICATED_API="true",
    )
    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    stack = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "h2k"),
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--flower",
            "--flower-port",
            str(flower_port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}"
    try:
        assert _wait_http(f"{api}/health", stack).json()["status"] == "healthy"
        deadline = time.monotonic() + 90
        while _wait_http(f"{api}/workers", stack).json()["active"] == 0:
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)

        source = make_image(images, "vmdk", size_mib=2, name="stack")
        job_id = f"stack-{uuid.uuid4().hex[:6]}"
        response = requests.post(
            f"{api}/jobs",
            json={
                "job_id": job_id,
                "operation": "convert",
                "image": {"path": source, "format": "vmdk"},
            },
            timeout=10,
        )
        assert response.status_code == 201, response.text
        assert wait_terminal(api, job_id)["state"] == "COMPLETED"
        assert (images / "stack.qcow2").exists()

        # Three gunicorn processes, one set of figures.
        completed = 'hyper2kvm_migration_total{operation="convert",status="completed"}'
        totals = set()
        for _ in range(9):
            text = requests.get(f"{api}/metrics", timeout=5).text
            totals.update(x for x in text.splitlines() if x.startswith(completed))
        assert len(totals) == 1 and totals.pop().endswith(" 1.0")
        # HTTP metrics of every gunicorn process, merged (multiprocess mode).
        assert 'flask_http_request_total{method="GET",status="200"}' in text

        # Flower lists the task under the job's id.
        deadline = time.monotonic() + 60
        while True:
            try:
                task = requests.get(
                    f"http://127.0.0.1:{flower_port}/api/task/info/{job_id}",
                    timeout=5,
                )
                if task.status_code == 200 and task.json().get("state") == "SUCCESS":
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "Flower never showed the task"
            time.sleep(0.5)
        assert task.json()["name"] == "h2k.run_job"
    finally:
        stack.send_signal(signal.SIGINT)
        stack.wait(timeout=60)
        log.close()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{api}/health", timeout=2)
    # The embedded Redis kept its data on disk.
    assert list((tmp_path / "data" / "redis").glob("appendonly*"))
