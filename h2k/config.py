"""Configuration read from the environment, once, into one object.

- ``REDIS_URL``: state, events, and the default broker and result backend
  (default ``redis://127.0.0.1:6379/0``).
- ``CELERY_BROKER_URL``, ``CELERY_RESULT_BACKEND``: overrides of the above.
- ``H2K_ALLOWED_ROOTS``: colon-separated directories images and outputs may
  lie in; none set refuses every path.
- ``H2K_EVENTS_MAXLEN``: events kept per job (default 10000).
- ``H2K_WORKER_STALE_SECONDS``: heartbeat age of a stale worker (default 300).
- ``H2K_REQUIRE_FORMAT_CHECK``: check the declared format with qemu-img at
  submission (default true).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from h2k.paths import parse_roots

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    redis_url: str
    broker_url: str
    result_backend: str
    allowed_roots: tuple[str, ...]
    events_maxlen: int
    worker_stale_seconds: int
    format_check: bool

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        redis_url = env.get("REDIS_URL") or DEFAULT_REDIS_URL
        return cls(
            redis_url=redis_url,
            broker_url=env.get("CELERY_BROKER_URL") or redis_url,
            result_backend=env.get("CELERY_RESULT_BACKEND") or redis_url,
            allowed_roots=parse_roots(env.get("H2K_ALLOWED_ROOTS")),
            events_maxlen=int(env.get("H2K_EVENTS_MAXLEN") or 10000),
            worker_stale_seconds=int(env.get("H2K_WORKER_STALE_SECONDS") or 300),
            format_check=_flag(env.get("H2K_REQUIRE_FORMAT_CHECK"), True),
        )
