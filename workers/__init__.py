"""The Celery side of h2k: ``celery -A workers worker`` and ``flower``."""

from workers.app import app

__all__ = ["app"]
