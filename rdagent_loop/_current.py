"""The run the current task belongs to: how a loop's own methods find their run.

The engine sets it in the task that drives a run; the tasks and worker threads it starts
inherit it (AnyIO copies the context into both). So ``dump`` finds the run's snapshot
writer and ``wait_for_capacity`` the run's events without the loop object holding the run.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._session import SnapshotWriter


class RunContext(Protocol):
    """What a loop's methods may ask of the run they are part of."""

    @property
    def loop(self) -> object: ...

    @property
    def writer(self) -> SnapshotWriter: ...

    async def wait_loop_finished(self) -> None: ...


current_run: ContextVar[RunContext | None] = ContextVar("rdagent_loop_current_run", default=None)


def run_of(loop: object) -> RunContext | None:
    """The run of ``loop`` that the calling task is part of, if any."""
    run = current_run.get()
    return run if run is not None and run.loop is loop else None
