"""What every operation receives and returns.

An operation is a function ``run(ctx: OperationContext) -> dict``. It reads
the job spec from ``ctx.spec`` (already validated: defaults filled in, paths
resolved inside the allowed roots), reports progress through
``ctx.report``, passes ``ctx.should_stop`` to every tool it runs, and returns
the result a person can check. When it cannot proceed it raises
:class:`h2k.errors.OperationError` with a phase and a code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class Reporter(Protocol):
    def __call__(
        self,
        phase: str,
        percentage: int | None,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None: ...


@dataclass
class OperationContext:
    job_id: str
    spec: dict[str, Any]
    report: Reporter
    should_stop: Callable[[], bool] = field(default=lambda: False)
    allowed_roots: tuple[str, ...] = ()

    @property
    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = self.spec.get("parameters") or {}
        return params


Operation = Callable[[OperationContext], dict[str, Any]]
