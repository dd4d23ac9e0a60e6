"""One Redis subscription per API process, fanned out to its SSE clients.

A daemon thread holds a pattern subscription to every job's channel and
hands each message to the queues of the clients watching that job. When the
subscription breaks it reconnects and tells every client to catch up from
the stream, so a gap in pub/sub never becomes a gap in what a client sees.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import redis

from h2k.store.events import channel_pattern, job_id_of_channel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveMessage:
    """A published event (``type`` and ``id`` as flask-sse sends them)."""

    data: dict[str, Any]
    type: str
    id: str


# Put on every client queue after a reconnect: read the stream to catch up.
RESYNC = LiveMessage({}, "resync", "")


class Subscription:
    def __init__(self, hub: EventHub, job_id: str):
        self.hub = hub
        self.job_id = job_id
        self.queue: queue.Queue[LiveMessage] = queue.Queue(maxsize=10000)

    def get(self, timeout: float) -> LiveMessage | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    def __init__(self, redis_url: str):
        # Its own connection: a subscription idles for as long as no job
        # moves, which must not read as a socket timeout.
        self.redis = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_connect_timeout=3,
            health_check_interval=15,
        )
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._pubsub: redis.client.PubSub | None = None

    def subscribe(self, job_id: str) -> Subscription:
        """Register a client; live messages published from now on reach it."""
        self._ensure_running()
        subscription = Subscription(self, job_id)
        with self._lock:
            self._subscribers[job_id].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            watchers = self._subscribers.get(subscription.job_id)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._subscribers[subscription.job_id]

    def close(self) -> None:
        """Stop the subscription thread and close its connection."""
        self._closed.set()
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                pubsub.close()
            except redis.RedisError:
                log.debug("closing the SSE subscription failed")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.redis.close()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._ready.clear()
                self._thread = threading.Thread(
                    target=self._run, name="h2k-sse-hub", daemon=True
                )
                self._thread.start()
        # Subscribing before replaying is what makes resumption gap-free.
        self._ready.wait(timeout=5)

    def _dispatch(self, job_id: str, message: LiveMessage) -> None:
        with self._lock:
            targets = list(self._subscribers.get(job_id, ()))
        for subscription in targets:
            try:
                subscription.queue.put_nowait(message)
            except queue.Full:
                log.warning("SSE client of job %s is not reading; dropped", job_id)

    def _broadcast_resync(self) -> None:
        with self._lock:
            targets = [s for subs in self._subscribers.values() for s in subs]
        for subscription in targets:
            try:
                subscription.queue.put_nowait(RESYNC)
            except queue.Full:
                continue

    def _run(self) -> None:
        backoff = 0.5
        first = True
        while not self._closed.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            try:
                pubsub.psubscribe(channel_pattern())
                pubsub.get_message(timeout=1.0)
                self._ready.set()
                if not first:
                    self._broadcast_resync()
                first = False
                backoff = 0.5
                for raw in pubsub.listen():
                    if raw.get("type") != "pmessage":
                        continue
                    body = json.loads(raw["data"])
                    self._dispatch(
                        job_id_of_channel(raw["channel"]),
                        LiveMessage(body["data"], body.get("type", ""), body["id"]),
                    )
            except (redis.ConnectionError, redis.TimeoutError, ValueError) as exc:
                # ValueError: the connection was closed under listen().
                if self._closed.is_set():
                    return
                log.warning("SSE subscription lost (%s); reconnecting", exc)
                self._ready.set()
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                try:
                    pubsub.close()
                except redis.RedisError:
                    log.debug("closing a broken subscription failed")
