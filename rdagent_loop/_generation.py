"""One generation of a run: a task group of a kickoff task and executor tasks.

The kickoff admits loops and runs each one's first step (RD-Agent's proposal code relies on
``loop_idx`` advancing one loop at a time), then hands the loop over, through a memory
object stream, to an executor task that runs its remaining steps in order. The kickoff
keeps loops in flight under ``max_parallel``, so the stream never holds more than that,
and an executor is started only when a loop is handed over while none is free (executors
are reused: spawning a task per loop cost ~10% of the engine's time per step). Task bodies
never let an exception escape into the task group (that would wrap it in an
ExceptionGroup): they note how the generation must end and cancel it, and the generation
returns that as one frozen :class:`GenerationEnd`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._compat import add_note
from ._errors import LoopResumeError, LoopTerminationError
from ._executors import StepTiming
from ._logging import log, step_context
from ._record import record_step
from ._results import StepResult, StopReason
from ._step_call import call_step

if TYPE_CHECKING:
    from ._loop import LoopBase
    from ._run import Run


@dataclass(frozen=True, slots=True)
class GenerationEnd:
    """How a generation ended. ``stop``: the run stops for this reason (``None`` with no
    errors, withdraw or restart: every admitted loop finished)."""

    stop: StopReason | None = None
    errors: tuple[BaseException, ...] = ()
    withdraw: tuple[int, BaseException] | None = None
    """The loop whose step raised a withdraw error, and that error: restore, then go on."""
    restart: bool = False
    """A step raised ``LoopResumeError``: start a new generation from the state as it is."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Generation:
    """Runs loops until they are all done or something ends the generation."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.loop: LoopBase = run.loop
        n = len(self.loop.steps)
        self.unfinished = {
            li for li in range(self.loop.loop_idx) if self.loop.step_idx.get(li, 0) < n
        }
        self.loops_running = 0  # handed over to the executors, not finished
        self.executors = 0  # executor tasks started: at most max_parallel
        self._handed: MemoryObjectSendStream[int]
        self._loops: MemoryObjectReceiveStream[int]
        self._handed, self._loops = anyio.create_memory_object_stream[int](run.max_parallel)
        self._stop: StopReason | None = None
        self._errors: list[BaseException] = []
        self._withdraw: tuple[int, BaseException] | None = None
        self._restart = False
        self._scope = anyio.CancelScope()
        self.running = False  # inside run_until_done: a failure can still end it

    async def run_until_done(self, deadline: float) -> GenerationEnd:
        """Run loops until none is left to run or something ends the generation."""
        self.running = True
        try:
            with self._handed, self._loops:  # closed however the generation ends
                async with anyio.create_task_group() as tg:
                    self._scope = tg.cancel_scope
                    if self.run.settings.grace_period > 0:  # all_cost may move the deadline
                        await tg.start(self.run.watch_grace, deadline)
                    await tg.start(self._kickoff, tg)
        finally:
            self.running = False
        return self.outcome()

    def outcome(self) -> GenerationEnd:
        """How the generation ended, also when the run's deadline cancelled it from outside."""
        return GenerationEnd(self._stop, tuple(self._errors), self._withdraw, self._restart)

    # -- how it ends ----------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        self._errors.append(error)
        self._scope.cancel("a step failed")

    def stop(self, reason: StopReason) -> None:
        if self._stop is None:
            self._stop = reason
        self._scope.cancel(f"stopped by {reason}")

    # -- tasks ----------------------------------------------------------------------------

    async def _kickoff(self, tg: TaskGroup, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            with self._handed:  # closing it ends the executors once they have run its loops
                await self._admit(tg)
        except Exception as exc:  # a bug of ours: report it like a step error
            self.fail(exc)

    async def _admit(self, tg: TaskGroup) -> None:
        """A resumed session's unfinished loops first, then new loops while ``loop_n`` lasts."""
        loop, run = self.loop, self.run
        n = len(loop.steps)
        for li in sorted(self.unfinished):
            await self._wait_for_room(lambda: self.loops_running)
            self._hand_over(tg, li)
        while loop.loop_n is None or loop.loop_n > 0:
            await self._wait_for_room(lambda: len(self.unfinished))
            li = loop.loop_idx
            self.unfinished.add(li)
            loop.withdraw_base[li] = run.last_snapshot
            loop.loop_prev_out[li][loop.LOOP_IDX_KEY] = li
            if not await self._run_step(li):
                return
            if loop.step_idx.get(li, 0) < n:
                self._hand_over(tg, li)

    async def _wait_for_room(self, count: Callable[[], int]) -> None:
        while count() >= self.run.max_parallel or self.run.closing:
            await self.run.wait_loop_finished()

    def _hand_over(self, tg: TaskGroup, li: int) -> None:
        self.loops_running += 1
        if self.executors < self.loops_running:  # none is free for it
            self.executors += 1
            tg.start_soon(self._executor, name=f"rdagent_loop executor {self.executors}")
        self._handed.send_nowait(li)  # room: fewer than max_parallel loops are handed over

    async def _executor(self) -> None:
        """Run the remaining steps of each loop handed over, in order."""
        n = len(self.loop.steps)
        try:
            async for li in self._loops:
                try:
                    while self.loop.step_idx.get(li, 0) < n:
                        if not await self._run_step(li):
                            return
                finally:
                    self.loops_running -= 1
        except Exception as exc:
            self.fail(exc)

    # -- one step -------------------------------------------------------------------------

    async def _run_step(self, li: int) -> bool:
        """Run the next step of loop ``li``; return False when the generation must end."""
        loop, run = self.loop, self.run
        si = loop.step_idx.get(li, 0)
        name = loop.steps[si]
        await run.writer.wait_room()  # a writer far behind slows the steps down
        slot = await run.limiters[name].take()
        try:
            await run.budget.reserve()
            await run.outlet.reserve()
            if run.closing:  # past the deadline: only the grace period's end is awaited
                run.budget.release()
                run.outlet.cancel_reservation()
                await anyio.sleep_forever()
            run.step_started(li, si, name)
            timing = StepTiming()
            error: BaseException | None = None
            try:
                with step_context(li, name), run.otel.step(li, si, name, timing):
                    output, attempts, retried = await call_step(
                        run.runner, run.journal, loop, li, si, name, timing, slot
                    )
            except BaseException as exc:
                skip = isinstance(exc, Exception) and isinstance(exc, loop.skip_loop_error)
                if not skip:
                    run.budget.release()
                    run.outlet.cancel_reservation()
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    self._step_failed(li, si, name, exc)
                    return False
                log.warning(
                    "loop %d step %s: %r, skipping ahead",
                    li,
                    name,
                    exc,
                    extra={"loop_idx": li, "step_name": name},
                )
                output, error, attempts, retried = None, exc, 1, ()
            finally:
                run.step_ended(name)
        finally:
            slot.release()
        if not self._complete(li, si, output, error, timing, attempts, retried):
            return False
        return self._after_step(li, si, name)

    def _complete(
        self,
        li: int,
        si: int,
        output: object,
        error: BaseException | None,
        timing: StepTiming,
        attempts: int,
        retried: tuple[BaseException, ...],
    ) -> bool:
        """Record a completed step, save it and deliver its result, all in one instant;
        False when saving failed (the generation then ends with that error)."""
        loop, run = self.loop, self.run
        ended = _utcnow()
        started, waits = timing.started_at, tuple(timing.waits)
        cost, tokens = timing.cost, timing.tokens
        next_step = record_step(loop, li, si, output, error, started, ended, waits, cost, tokens)
        loop_done = next_step >= len(loop.steps)
        name = loop.steps[si]
        result = StepResult(
            li, si, name, output, error, started, ended, attempts, retried, cost, tokens
        )
        if loop_done:
            self.unfinished.discard(li)
        try:
            run.step_recorded(result, loop_done=loop_done)
        except Exception as problem:
            self.fail(problem)
            return False
        return True

    def _after_step(self, li: int, si: int, name: str) -> bool:
        try:
            self.loop._check_exit_conditions_on_step(li, si)
        except LoopTerminationError as exc:
            log.warning("loop %d step %s: %s; the run stops", li, name, exc)
            self.stop("terminated")
            return False
        except Exception as exc:
            add_note(exc, f"raised by _check_exit_conditions_on_step after loop {li} step {name!r}")
            self.fail(exc)
            return False
        if self.run.budget.exhausted:
            self.stop("step_n")
            return False
        return True

    def _step_failed(self, li: int, si: int, name: str, exc: BaseException) -> None:
        if isinstance(exc, LoopTerminationError):
            log.warning("loop %d step %s: %s; the run stops", li, name, exc)
            self.stop("terminated")
        elif isinstance(exc, LoopResumeError):
            self._restart = True
            self._scope.cancel("LoopResumeError")
        elif isinstance(exc, Exception) and isinstance(exc, self.loop.withdraw_loop_error):
            log.warning(
                "loop %d step %s: %r; withdrawing",
                li,
                name,
                exc,
                extra={"loop_idx": li, "step_name": name},
            )
            if self._withdraw is None:
                self._withdraw = (li, exc)
            self._scope.cancel("withdraw")
        else:
            add_note(exc, f"raised by loop {li}, step {si} ({name!r})")
            self.fail(exc)
