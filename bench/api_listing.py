"""Submitting and listing jobs through the API, against the alternatives.

Stores jobs in a Redis of its own, then prints, side by side:

- submissions a second with the qemu-img format check and without it;
- ``GET /jobs?limit=100`` and ``GET /jobs?state=...`` served from the sorted
  set indexes, against what a store without indexes must do (SCAN every job
  hash, then sort).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis

from h2k.config import Settings
from h2k.embedded import start_redis
from tests.images import make_image

JOBS = 2000


def _median_ms(run: Callable[[], Any], rounds: int = 20) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _submit(client: Any, source: str, prefix: str, count: int) -> float:
    start = time.perf_counter()
    for n in range(count):
        response = client.post(
            "/jobs?queue=false",
            json={
                "job_id": f"{prefix}-{n}",
                "operation": "convert",
                "image": {"path": source, "format": "vmdk"},
            },
        )
        assert response.status_code == 201, response.get_data(as_text=True)
    return count / (time.perf_counter() - start)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_redis(os.path.join(folder, "redis"), persist=False)
        try:
            images = os.path.join(folder, "images")
            os.makedirs(images)
            source = make_image(images, "vmdk", size_mib=1, name="src")
            os.environ.update(REDIS_URL=url, H2K_ALLOWED_ROOTS=images)
            from web import create_app

            settings = Settings.from_env()
            checked = create_app({"H2K_SETTINGS": settings}).test_client()
            unchecked = create_app(
                {"H2K_SETTINGS": replace(settings, format_check=False)}
            ).test_client()

            checked_rate = _submit(checked, source, "checked", JOBS // 4)
            unchecked_rate = _submit(unchecked, source, "unchecked", JOBS)
            total = JOBS + JOBS // 4

            raw = redis.Redis.from_url(url, decode_responses=True)

            def scan_all() -> None:
                rows = [
                    raw.hmget(key, "seq", "state")
                    for key in raw.scan_iter("h2k:job:*", count=1000)
                    if key.count(":") == 2
                ]
                rows.sort(key=lambda row: -int(row[0]))
                del rows[100:]

            indexed = _median_ms(lambda: checked.get("/jobs?limit=100"))
            filtered = _median_ms(
                lambda: checked.get("/jobs?state=VALIDATED&limit=100")
            )
            scanned = _median_ms(scan_all, rounds=5)
        finally:
            process.terminate()
            process.wait()

    print("submissions (validation, paths, atomic create)")
    print(f"  with the qemu-img format check   {checked_rate:8.0f} jobs/s   1.00x")
    print(
        f"  without it                       {unchecked_rate:8.0f} jobs/s   "
        f"{unchecked_rate / checked_rate:.2f}x"
    )
    print(f"listing the newest 100 of {total} jobs, median")
    print(f"  GET /jobs?limit=100 (index)              {indexed:8.2f} ms   1.00x")
    print(
        f"  GET /jobs?state=VALIDATED&limit=100      {filtered:8.2f} ms   "
        f"{filtered / indexed:.2f}x"
    )
    print(
        f"  SCAN every job and sort (no index)       {scanned:8.2f} ms   "
        f"{scanned / indexed:.2f}x"
    )


if __name__ == "__main__":
    main()
