"""What every executor gets (a ``StepCall``) and what it must offer (``Executor``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from .._steps import StepOptions


@dataclass(slots=True)
class StepTiming:
    """When a step started: taken by the engine as it calls the step, and taken again by an
    executor that first had to wait for something that is not the step (a worker process
    importing the application), so a step's times measure the step."""

    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    waits: list[tuple[datetime, datetime]] = field(default_factory=list)
    """When the step waited for answers (``loop.ask``): shown apart in the timeline."""
    cost: float = 0.0
    """What the step reported spending (``loop.charge``), over all its attempts."""
    tokens: int = 0

    def restart(self) -> None:
        self.started_at = datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class StepCall:
    """One call of one step: the bound method, its ``prev_out`` and its declared policies."""

    loop_idx: int
    step_idx: int
    name: str
    func: Callable[[dict[str, Any]], Any]
    prev_out: dict[str, Any]
    options: StepOptions
    timing: StepTiming = field(default_factory=StepTiming)

    def describe(self) -> str:
        return f"step {self.name!r} of loop {self.loop_idx}"


class Executor(Protocol):
    """Runs step calls for one ``run()``; closed when the run ends, however it ends.

    ``run`` returns the step's output or raises the step's exception as itself. When the
    calling task is cancelled, ``run`` stops the step (or abandons it, for threads) before
    the cancellation propagates. ``aclose`` releases what the executor holds (processes,
    cluster connections) and must return promptly even while the run is being cancelled.
    """

    async def run(self, call: StepCall) -> Any: ...

    async def aclose(self) -> None: ...
