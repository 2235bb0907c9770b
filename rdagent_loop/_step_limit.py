"""How many instances of one step may run at once: a semaphore taken at every step."""

from __future__ import annotations

import anyio
import anyio.lowlevel


class StepSlot:
    """One step's place under its limit. A step that waits for a person (``loop.ask``) hands
    it back while it waits (``release``) and takes one again before it goes on (``retake``),
    so a sibling loop can run that step meanwhile. Releasing is idempotent: the engine
    releases whatever the step still holds when it ends."""

    __slots__ = ("_semaphore", "held")

    def __init__(self, semaphore: anyio.Semaphore) -> None:
        self._semaphore = semaphore
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()

    async def retake(self) -> None:
        if not self.held:
            await self._semaphore.acquire()
            self.held = True


class StepLimit:
    """A semaphore whose ``take`` yields once, not twice.

    ``Semaphore.acquire`` checks for cancellation, then yields inside a shielded cancel scope
    of its own; at every step that was a tenth of the engine's cost. A free slot here is
    taken at once, then the task yields a single time (where cancellation reaches it, as
    it would in the step); a busy one waits in the semaphore's fair queue.
    """

    __slots__ = ("_semaphore",)

    def __init__(self, limit: int) -> None:
        self._semaphore = anyio.Semaphore(limit)

    async def take(self) -> StepSlot:
        semaphore = self._semaphore
        try:
            semaphore.acquire_nowait()
        except anyio.WouldBlock:
            await semaphore.acquire()
            return StepSlot(semaphore)
        try:
            await anyio.lowlevel.checkpoint()
        except BaseException:
            semaphore.release()
            raise
        return StepSlot(semaphore)
