"""How many instances of one step may run at once: a semaphore taken at every step."""

from __future__ import annotations

from types import TracebackType

import anyio
import anyio.lowlevel


class StepLimit:
    """An async context manager around ``anyio.Semaphore`` that yields once, not twice.

    ``Semaphore.acquire`` checks for cancellation, then yields inside a shielded cancel scope
    of its own; at every step that was a tenth of the engine's cost. A free slot here is
    taken at once, then the task yields a single time (where cancellation reaches it, as
    it would in the step); a busy one waits in the semaphore's fair queue.
    """

    __slots__ = ("_semaphore",)

    def __init__(self, limit: int) -> None:
        self._semaphore = anyio.Semaphore(limit)

    async def __aenter__(self) -> None:
        semaphore = self._semaphore
        try:
            semaphore.acquire_nowait()
        except anyio.WouldBlock:
            await semaphore.acquire()
            return
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            semaphore.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._semaphore.release()
