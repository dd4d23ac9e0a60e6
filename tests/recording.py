"""Progress events kept as the job store would keep them, and cancellation.

:class:`Recorder` is the reporter every operation test hands to its
:class:`~h2k.operations.base.OperationContext`; :class:`StopAfter` is the
``should_stop`` that turns true once a chosen phase was reported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class Recorder:
    """A reporter that keeps every progress event, as the job store would."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None] | None = None):
        self.events: list[dict[str, Any]] = []
        self.on_event = on_event

    def __call__(
        self,
        phase: str,
        percentage: int | None,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        event = {
            "phase": phase,
            "percentage": percentage,
            "message": message,
            "details": dict(details or {}),
        }
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def of(self, phase: str) -> list[dict[str, Any]]:
        """The events of ``phase``, in the order they came."""
        return [e for e in self.events if e["phase"] == phase]

    @property
    def phases(self) -> list[str]:
        """The phases in the order they were first entered."""
        return list(dict.fromkeys(e["phase"] for e in self.events))


class StopAfter:
    """A should_stop that turns true once an event of ``phase`` was reported.

    With ``phase`` None, the first event of any phase will do.
    """

    def __init__(self, phase: str | None = None):
        self.phase = phase
        self.stop = False
        self.recorder = Recorder(self._seen)

    def _seen(self, event: dict[str, Any]) -> None:
        if self.phase is None or event["phase"] == self.phase:
            self.stop = True

    def __call__(self) -> bool:
        return self.stop
