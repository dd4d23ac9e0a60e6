"""A job waits in its queue until a worker that can run it appears."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests
from werkzeug.serving import make_server

from h2k.embedded import free_port
from tests import guestdisks
from tests.e2e.conftest import wait_terminal
from tests.images import make_image

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def routed(settings, env, redis_url, worker_factory):
    """An API and workers on a broker of their own (Redis database 2)."""
    from web import create_app

    broker = redis_url.rsplit("/", 1)[0] + "/2"
    app = create_app({"H2K_SETTINGS": dataclasses.replace(settings, broker_url=broker)})
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    narrow = worker_factory(
        "qemu-only", CELERY_BROKER_URL=broker, H2K_CAPABILITIES="qemu_img"
    )
    narrow.wait_registered(redis.Redis.from_url(redis_url))
    yield f"http://127.0.0.1:{port}", broker
    server.shutdown()


def test_job_needing_more_waits_in_its_queue(
    routed, images_root: Path, worker_factory, redis_url
):
    api, broker = routed
    folder = images_root / "routing"
    folder.mkdir(exist_ok=True)
    source = make_image(folder, "vmdk", size_mib=1, name="needs-lvm")
    plain = make_image(folder, "vmdk", size_mib=1, name="plain")
    waiting = f"waits-{uuid.uuid4().hex[:6]}"
    runs = f"runs-{uuid.uuid4().hex[:6]}"

    workers = requests.get(f"{api}/workers", timeout=10).json()["workers"]
    narrow = next(w for w in workers if w["worker_id"] == "qemu-only@h2k-test")
    assert narrow["capabilities"] == ["qemu_img"]
    assert narrow["system_info"]["queues"] == ["qemu_img"]

    response = requests.post(
        f"{api}/jobs",
        json={
            "job_id": waiting,
            "operation": "convert",
            "image": {"path": source, "format": "vmdk"},
            "capability_requirements": ["lvm_tools"],
        },
        timeout=10,
    )
    assert response.status_code == 201
    requests.post(
        f"{api}/jobs",
        json={
            "job_id": runs,
            "operation": "convert",
            "image": {"path": plain, "format": "vmdk"},
        },
        timeout=10,
    )

    # The narrow worker runs what it can and leaves the rest queued.
    assert wait_terminal(api, runs)["state"] == "COMPLETED"
    time.sleep(2)
    job = requests.get(f"{api}/jobs/{waiting}", timeout=10).json()
    assert job["state"] == "QUEUED"
    assert job["queue"] == "lvm_tools"
    queue = requests.get(f"{api}/queue", timeout=10).json()
    assert queue["by_queue"]["lvm_tools"] >= 1

    # A guest operation needs mount_operations: it waits the same way.
    guest = guestdisks.rhel_guest(str(folder), name="routed")
    inspect = f"inspect-{uuid.uuid4().hex[:6]}"
    requests.post(
        f"{api}/jobs",
        json={
            "job_id": inspect,
            "operation": "inspect",
            "image": {"path": guest.image, "format": "vmdk"},
        },
        timeout=10,
    )
    time.sleep(2)
    assert requests.get(f"{api}/jobs/{inspect}", timeout=10).json()["state"] == (
        "QUEUED"
    )
    queue = requests.get(f"{api}/queue", timeout=10).json()
    assert queue["by_queue"]["mount_operations"] >= 1

    # A worker holding every capability picks both up.
    wide = worker_factory("all-capabilities", CELERY_BROKER_URL=broker)
    wide.wait_registered(redis.Redis.from_url(redis_url))
    done = wait_terminal(api, waiting)
    assert done["state"] == "COMPLETED"
    assert done["worker_id"] == "all-capabilities@h2k-test"
    inspected = wait_terminal(api, inspect)
    assert inspected["state"] == "COMPLETED", inspected
    assert inspected["worker_id"] == "all-capabilities@h2k-test"
    wide.stop()
