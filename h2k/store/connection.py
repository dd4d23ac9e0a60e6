"""The Redis connection and the mapping of its failures onto h2k errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import resources

import redis
from redis.commands.core import Script

from h2k.errors import Unavailable

PREFIX = "h2k:"


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
        retry_on_timeout=False,
    )


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turn an unreachable Redis into :class:`Unavailable`."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise Unavailable(f"Redis is unreachable: {exc}") from exc
    except redis.BusyLoadingError as exc:
        raise Unavailable("Redis is loading its data set; try again") from exc


def load_script(client: redis.Redis, name: str) -> Script:
    source = resources.files("h2k.store.lua").joinpath(f"{name}.lua").read_text()
    return client.register_script(source)
