"""Step executors: where a step's function runs.

For now every step runs on the event loop: async steps are awaited, sync steps are called
inline. ``StepRunner`` is the seam where thread, process and Ray executors plug in.
"""

from __future__ import annotations

import inspect
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._loop import LoopBase


class StepRunner:
    """Runs step functions for one ``run()``; lives as long as the run (across generations)."""

    def __init__(self, loop: LoopBase) -> None:
        self.loop = loop

    async def __aenter__(self) -> StepRunner:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def call(self, loop_idx: int, step_idx: int, name: str, prev_out: dict[str, Any]) -> Any:
        """Run step ``name`` of loop ``loop_idx`` and return its output."""
        func = getattr(self.loop, name)
        result = func(prev_out)
        if inspect.isawaitable(result):
            return await result
        return result
