"""Map the wire priority (0-100, higher first) onto the broker's levels.

Celery carries priorities 0-9. RabbitMQ serves the higher number first; the
Redis transport keeps one list per level and serves the lower number first.
"""

from __future__ import annotations

LEVELS = 10
DEFAULT_PRIORITY = 50


def level(priority: int) -> int:
    """0 (lowest) to 9 (highest) for a wire priority of 0 to 100."""
    if not 0 <= priority <= 100:
        raise ValueError(f"priority {priority} is outside 0-100")
    return min(LEVELS - 1, priority * LEVELS // 101)


def broker_priority(priority: int, broker_url: str) -> int:
    """The Celery ``priority`` to publish with, for this broker."""
    scheme = broker_url.split("://", 1)[0].lower()
    if scheme.startswith(("redis", "rediss", "valkey", "sentinel")):
        return LEVELS - 1 - level(priority)
    return level(priority)
