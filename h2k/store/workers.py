"""The worker registry: who is there, what it can do, when it last spoke.

Keys: ``worker:{id}`` (hash: capabilities, system_info, execution_mode,
registered_at, last_heartbeat) and ``workers`` (sorted set of ids by last
heartbeat, epoch seconds), so stale workers are a range query.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import redis

from h2k.errors import NotFound
from h2k.store.connection import PREFIX, redis_errors
from h2k.store.jobs import isoformat, utcnow

INDEX = f"{PREFIX}workers"


def _key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def _decode(raw: dict[str, str], stale_after: int, now: float) -> dict[str, Any]:
    last = float(raw["last_heartbeat_epoch"])
    return {
        "worker_id": raw["worker_id"],
        "capabilities": json.loads(raw["capabilities"]),
        "system_info": json.loads(raw.get("system_info") or "{}"),
        "execution_mode": raw.get("execution_mode"),
        "registered_at": raw["registered_at"],
        "last_heartbeat": raw["last_heartbeat"],
        "active": now - last <= stale_after,
    }


class WorkerRegistry:
    def __init__(self, client: redis.Redis, stale_after: int = 300):
        self.redis = client
        self.stale_after = stale_after

    def register(self, registration: dict[str, Any]) -> dict[str, Any]:
        now = utcnow()
        worker_id = registration["worker_id"]
        fields = {
            "worker_id": worker_id,
            "capabilities": json.dumps(registration["capabilities"]),
            "system_info": json.dumps(registration.get("system_info") or {}),
            "execution_mode": registration.get("execution_mode") or "",
            "registered_at": isoformat(now),
            "last_heartbeat": isoformat(now),
            "last_heartbeat_epoch": now.timestamp(),
        }
        with redis_errors():
            pipe = self.redis.pipeline()
            # redis-py types the mapping with an invariant key union.
            pipe.hset(_key(worker_id), mapping=cast(Any, fields))
            pipe.zadd(INDEX, {worker_id: now.timestamp()})
            pipe.execute()
        return self.get(worker_id)

    def heartbeat(self, worker_id: str) -> str:
        now = utcnow()
        with redis_errors():
            if not self.redis.exists(_key(worker_id)):
                raise NotFound(f"Worker {worker_id} not found")
            pipe = self.redis.pipeline()
            pipe.hset(
                _key(worker_id),
                mapping={
                    "last_heartbeat": isoformat(now),
                    "last_heartbeat_epoch": now.timestamp(),
                },
            )
            pipe.zadd(INDEX, {worker_id: now.timestamp()})
            pipe.execute()
        return isoformat(now)

    def get(self, worker_id: str) -> dict[str, Any]:
        with redis_errors():
            raw = cast(dict[str, str], self.redis.hgetall(_key(worker_id)))
        if not raw:
            raise NotFound(f"Worker {worker_id} not found")
        return _decode(raw, self.stale_after, time.time())

    def all(self) -> list[dict[str, Any]]:
        with redis_errors():
            ids = cast(list[str], self.redis.zrevrange(INDEX, 0, -1))
            pipe = self.redis.pipeline(transaction=False)
            for worker_id in ids:
                pipe.hgetall(_key(worker_id))
            rows = pipe.execute()
        now = time.time()
        return [_decode(raw, self.stale_after, now) for raw in rows if raw]

    def count_active(self) -> int:
        with redis_errors():
            return int(self.redis.zcount(INDEX, time.time() - self.stale_after, "+inf"))

    def unregister(self, worker_id: str) -> None:
        with redis_errors():
            pipe = self.redis.pipeline()
            pipe.delete(_key(worker_id))
            pipe.zrem(INDEX, worker_id)
            deleted, _ = pipe.execute()
        if not deleted:
            raise NotFound(f"Worker {worker_id} not found")
