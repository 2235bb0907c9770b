"""Where finished steps go: one bounded stream, with room reserved before a step starts.

A step takes a slot of the outlet as it takes a unit of the step budget, before it starts;
so its result is sent with ``send_nowait`` in the same instant the step is recorded, and a
slow consumer slows the engine down at the start of the next step instead of growing
memory. The consumer gives the slot back as it receives the result. The stream holds
``result_buffer`` results plus one per step that may be in flight (``max_parallel``), so
the buffer bounds how far the engine runs ahead, never how many steps run at once.
"""

from __future__ import annotations

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._progress import NoProgress, Progress
from ._results import Question, StepResult

Item = StepResult | Question


class ResultOutlet:
    """The stream of one run's results, for a consumer that reads them."""

    def __init__(
        self, result_buffer: int, max_parallel: int, progress: Progress | None = None
    ) -> None:
        self.progress: Progress = progress or NoProgress()
        size = result_buffer + max_parallel
        self._slots = anyio.Semaphore(size)
        self.send: MemoryObjectSendStream[Item]
        self.receive: MemoryObjectReceiveStream[Item]
        self.send, self.receive = anyio.create_memory_object_stream[Item](size)

    async def reserve(self) -> None:
        """Wait for room for one more result (at once when there is some)."""
        try:
            self._slots.acquire_nowait()
        except anyio.WouldBlock:
            await self._slots.acquire()

    def cancel_reservation(self) -> None:
        """The step that reserved room did not complete."""
        self._slots.release()

    def deliver(self, result: Item) -> None:
        """Send a recorded step's result (or a journaled question); its room was reserved,
        so this never waits."""
        try:
            self.send.send_nowait(result)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._slots.release()  # the consumer has left: nobody will take it

    def taken(self, result: Item) -> None:
        """The consumer received ``result``: its room is free again."""
        self._slots.release()
        if isinstance(result, StepResult):
            self.progress.step_completed(result)

    def engine_done(self) -> None:
        """The engine ended; the consumer may still be reading what it sent."""

    @property
    def pending(self) -> int:
        """Results sent and not received yet."""
        return self.send.statistics().current_buffer_used

    def close(self) -> None:
        """Close both ends and the progress display (again is harmless). The engine's
        ``deliver`` to a closed stream gives its room back and drops the result."""
        self.send.close()
        self.receive.close()
        self.progress.close()


class DiscardOutlet(ResultOutlet):
    """For ``await loop.run()``: nobody reads the results, so none is kept."""

    def __init__(self, progress: Progress | None = None) -> None:
        super().__init__(0, 0, progress)

    async def reserve(self) -> None:
        pass

    def cancel_reservation(self) -> None:
        pass

    def deliver(self, result: Item) -> None:
        if isinstance(result, StepResult):
            self.progress.step_completed(result)

    def engine_done(self) -> None:
        self.progress.close()
