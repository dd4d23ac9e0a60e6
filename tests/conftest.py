"""Shared fixtures: a real Redis of the tests' own, the app, real workers."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from h2k.config import Settings
from h2k.embedded import start_redis

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_redis(str(tmp_path_factory.mktemp("redis")), persist=False)
    yield url
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="session")
def images_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="session")
def env(redis_url: str, images_root: Path) -> dict[str, str]:
    # Celery lets CELERY_BROKER_URL in the environment override any
    # configuration, so the tests set only REDIS_URL, from which h2k derives
    # the broker, and tests that need another broker pass Settings.
    values = {"REDIS_URL": redis_url, "H2K_ALLOWED_ROOTS": str(images_root)}
    for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ.pop(name, None)
    os.environ.update(values)
    return dict(os.environ)


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def app(settings: Settings):
    """The API with a broker no worker consumes: queued jobs stay QUEUED."""
    from web import create_app

    idle_broker = settings.redis_url.rsplit("/", 1)[0] + "/1"
    return create_app(
        {
            "TESTING": True,
            "H2K_SETTINGS": dataclasses.replace(settings, broker_url=idle_broker),
        }
    )


@pytest.fixture
def client(app):
    return app.test_client()


class WorkerProcess:
    """A real ``celery -A workers worker`` in a subprocess."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *extra: str):
        self.name = f"{name}@h2k-test"
        self.log_path = log_dir / f"{name}.log"
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers",
            "worker",
            "-n",
            self.name,
            "-c",
            "1",
            "-P",
            "prefork",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            *extra,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_registered(self, client: redis.Redis, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.exists(f"h2k:worker:{self.name}"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"worker {self.name} did not register:\n{self.log_path.read_text()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def worker_factory(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    started: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("worker-logs")

    def start(name: str, *extra: str, **extra_env: str) -> WorkerProcess:
        worker = WorkerProcess(name, {**env, **extra_env}, log_dir, *extra)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
