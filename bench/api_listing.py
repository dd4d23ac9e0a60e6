"""Listing jobs from h2k's indexes against scanning every job, side by side.

Stores N jobs in a Redis of its own, then times ``GET /jobs?limit=100`` and
``GET /jobs?state=...`` through the app, and, beside them, what a store
without indexes must do: SCAN every job hash and sort. Also times submission
(validation, path and format checks, the atomic create).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import redis

from h2k.config import Settings
from h2k.embedded import start_redis
from tests.images import make_image

JOBS = 2000


def _median_ms(run, rounds: int = 20) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_redis(os.path.join(folder, "redis"), persist=False)
        try:
            images = os.path.join(folder, "images")
            os.makedirs(images)
            source = make_image(images, "vmdk", size_mib=1, name="src")
            os.environ.update(REDIS_URL=url, H2K_ALLOWED_ROOTS=images)
            from web import create_app

            app = create_app({"H2K_SETTINGS": Settings.from_env()})
            client = app.test_client()

            start = time.perf_counter()
            for n in range(JOBS):
                response = client.post(
                    "/jobs?queue=false",
                    json={
                        "job_id": f"bench-{n}",
                        "operation": "convert",
                        "image": {"path": source, "format": "vmdk"},
                    },
                )
                assert response.status_code == 201
            submit_rate = JOBS / (time.perf_counter() - start)

            raw = redis.Redis.from_url(url, decode_responses=True)

            def scan_all() -> None:
                rows = []
                for key in raw.scan_iter("h2k:job:*", count=1000):
                    if key.count(":") == 2:
                        rows.append(raw.hmget(key, "seq", "state"))
                rows.sort(key=lambda row: -int(row[0]))
                del rows[100:]

            indexed = _median_ms(lambda: client.get("/jobs?limit=100"))
            filtered = _median_ms(lambda: client.get("/jobs?state=VALIDATED&limit=100"))
            scanned = _median_ms(scan_all, rounds=5)
        finally:
            process.terminate()
            process.wait()

    print(
        f"{JOBS} jobs stored; submission {submit_rate:.0f} jobs/s "
        "(validation, path and qemu-img format check, atomic create)"
    )
    print(f"  GET /jobs?limit=100 from the index        {indexed:8.2f} ms   1.00x")
    print(
        f"  GET /jobs?state=VALIDATED&limit=100       {filtered:8.2f} ms   "
        f"{filtered / indexed:.2f}x"
    )
    print(
        f"  SCAN every job and sort (no index)        {scanned:8.2f} ms   "
        f"{scanned / indexed:.2f}x"
    )


if __name__ == "__main__":
    main()
