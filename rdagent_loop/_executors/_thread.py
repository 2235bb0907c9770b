"""The ``thread`` executor: a sync step runs in a worker thread of AnyIO's thread pool.

Each step name has its own ``CapacityLimiter`` (its step limit), so thread steps neither
starve nor are starved by other users of AnyIO's default limiter. A thread cannot be
interrupted: when the step is cancelled (deadline, error elsewhere, the consumer leaving),
the thread is abandoned with a warning naming the step, and the run goes on without it.
The thread shares ``self`` with the event loop; see the package docstring.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio

from .._journal import current_step
from ._base import StepCall

log = logging.getLogger("rdagent_loop")


class ThreadExecutor:
    def __init__(self, limit_of: Callable[[str], int]) -> None:
        self._limit_of = limit_of
        self._limiters: dict[str, anyio.CapacityLimiter] = {}

    def _limiter(self, name: str) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(name)
        if limiter is None:
            limiter = self._limiters[name] = anyio.CapacityLimiter(self._limit_of(name))
        return limiter

    async def run(self, call: StepCall) -> Any:
        limiter = self._limiter(call.name)
        sj = current_step.get()
        if sj is not None:  # while the step waits for an answer, its thread is lent out
            sj.lenders.append(_LentThread(limiter))
        started = threading.Event()
        finished = threading.Event()

        def target() -> Any:
            call.timing.restart()  # waiting for a thread is not the step's time
            started.set()
            try:
                return call.func(call.prev_out)
            finally:
                finished.set()

        try:
            return await anyio.to_thread.run_sync(target, limiter=limiter, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            if started.is_set() and not finished.is_set():
                log.warning(
                    "%s was cancelled while running in a thread; a thread cannot be "
                    "interrupted, so it is abandoned and runs on until the function returns "
                    "(its result is dropped)",
                    call.describe(),
                    extra={"loop_idx": call.loop_idx, "step_name": call.name},
                )
            raise

    async def aclose(self) -> None:
        return None


class _LentThread:
    """A thread step waiting for an answer: one more thread may run the step meanwhile."""

    def __init__(self, limiter: anyio.CapacityLimiter) -> None:
        self.limiter = limiter

    def lend(self) -> None:
        self.limiter.total_tokens += 1

    def take_back(self) -> None:
        self.limiter.total_tokens -= 1
