"""The run handle (await / async with / async for) and the engine behind it.

One ``RunState`` per ``run()``. It opens one task group per *generation*: a kickoff task
that admits loops and runs their first step, and up to ``max_parallel`` executor tasks
(started as loops are handed over) that run the remaining steps of admitted loops in
order. Task bodies never let an exception escape into a task group (that would wrap it in
an ExceptionGroup): they record the outcome and cancel the generation, and the engine
raises the error as itself afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import pickle
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Coroutine, Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._backend import spawn_detached
from ._budget import StepBudget
from ._compat import BaseExceptionGroup, add_note
from ._errors import LoopResumeError, LoopTerminationError, SnapshotError, StepTimeoutError
from ._executors import StepRunner
from ._logging import log, step_context
from ._progress import make_progress
from ._results import LoopTrace, RunSummary, StepResult, StopReason
from ._session import SnapshotWriter
from ._step_limit import StepLimit

if TYPE_CHECKING:
    from ._loop import LoopBase


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """A picture of a run in progress."""

    steps_completed: int
    loops_completed: int
    loops_in_flight: int
    steps_running: dict[str, int]
    peak_steps_running: dict[str, int]
    results_pending: int
    executors: int = 0
    """Executor tasks the current generation has started: one per loop handed over while
    none was free, at most ``max_parallel``."""


@dataclass
class _Outcome:
    """How the engine ended, shared between the driver task and the consumer."""

    summary: RunSummary | None = None
    error: BaseException | None = None
    delivered: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)


class RunState:
    """The engine of one ``run()``: budgets, limiters, generations, and the result pipeline."""

    def __init__(
        self,
        loop: LoopBase,
        *,
        step_n: int | None,
        loop_n: int | None,
        all_duration: timedelta | None,
    ) -> None:
        self.loop = loop
        self.settings = loop.settings
        self._step_n_arg = step_n
        self._loop_n_arg = loop_n
        self._all_duration = all_duration
        self.max_parallel = self.settings.max_parallel
        self.runner = StepRunner(loop)
        self.limiters = {name: StepLimit(self.runner.limit_of(name)) for name in loop.steps}
        self.budget = StepBudget(None)
        self.steps_completed = 0
        self.finished_loops: set[int] = set()  # finished in this run (and not rolled back)
        self.running: Counter[str] = Counter()
        self.peak_running: Counter[str] = Counter()
        self.in_flight = 0
        self.unfinished: set[int] = set()
        self.stop_reason: StopReason | None = None
        self.closing = False  # past the deadline, inside the grace period
        self.last_snapshot: str | None = None
        self._loop_folders: dict[int, tuple[Path, Path]] = {}  # li -> (session, its folder)
        self._initial_state: bytes | None = None
        self._errors: list[BaseException] = []
        self._withdraw: tuple[int, BaseException] | None = None
        self._restart = False
        self._loop_finished = anyio.Event()
        self._pending: deque[StepResult] = deque()
        self.stream_results = True  # False when nobody reads them (``await loop.run()``)
        self._pending_changed = anyio.Event()
        self._room = anyio.Event()
        self._finished = False
        self._gen_scope = anyio.CancelScope()
        self._gen_tg: TaskGroup | None = None
        self._exec_recv: MemoryObjectReceiveStream[int] | None = None
        self._receivers: list[MemoryObjectReceiveStream[int]] = []
        self._free_executors = 0  # waiting for a loop, none handed to them yet
        self._backlog = 0  # loops handed over while every executor was busy
        self._run_scope = anyio.CancelScope()
        self._grace_scope: anyio.CancelScope | None = None
        # loop.dump() hands it the bytes to write
        self.snapshot_writer = SnapshotWriter(mode=loop.settings.snapshot_writer)
        self.progress = make_progress(loop, step_n=step_n, loop_n=loop_n)

    # -- public helpers -------------------------------------------------------------------

    def claim(self) -> None:
        """Mark the loop object as running (one run at a time), at the moment of consumption."""
        if self.loop._run_state is not None:
            raise RuntimeError(
                f"{type(self.loop).__name__} is already running; one run() at a time"
            )
        self.loop._run_state = self

    def release(self) -> None:
        if self.loop._run_state is self:
            self.loop._run_state = None

    def statistics(self) -> RunStatistics:
        return RunStatistics(
            steps_completed=self.steps_completed,
            loops_completed=len(self.finished_loops),
            loops_in_flight=len(self.unfinished),
            steps_running=dict(self.running),
            peak_steps_running=dict(self.peak_running),
            results_pending=len(self._pending),
            executors=len(self._receivers),
        )

    async def wait_loop_finished(self) -> None:
        """Wait until some loop finishes (or the run starts closing)."""
        await self._loop_finished.wait()

    def _notify_loop_finished(self) -> None:
        self._loop_finished.set()
        self._loop_finished = anyio.Event()

    # -- the run --------------------------------------------------------------------------

    async def main(self, send: MemoryObjectSendStream[StepResult]) -> RunSummary:
        loop = self.loop
        error: BaseException | None = None
        try:
            self._apply_budgets()
            async with self.snapshot_writer, self.runner, anyio.create_task_group() as outer:
                outer.start_soon(self._forward, send)
                try:
                    await self._run_generations()
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:
                    # results recorded before the error still reach the consumer, then it
                    error = exc
                finally:
                    self._finished = True
                    self._pending_changed.set()
        finally:
            loop.timer.disarm()
            self.release()
            self.progress.close()
        if error is not None:
            raise error
        assert self.stop_reason is not None
        summary = RunSummary(self.steps_completed, len(self.finished_loops), self.stop_reason)
        log.info("run ended: %s", summary)
        return summary

    def _apply_budgets(self) -> None:
        loop = self.loop
        n = len(loop.steps)
        started = [li for li in range(loop.loop_idx) if loop.step_idx.get(li, 0) < n]
        if self._step_n_arg is not None:
            loop.step_n = self._step_n_arg
        elif loop.step_n == 0:
            # a step budget that was spent ended its run; an unspent one (a crash) carries on
            loop.step_n = None
        if self._loop_n_arg is not None:
            # unfinished loops of a resumed session count first
            loop.loop_n = max(0, self._loop_n_arg - len(started))
        if self._all_duration is not None and not loop.timer.started:
            loop.timer.reset(self._all_duration)
        self.budget = StepBudget(loop.step_n)
        if loop.withdraw_loop_error:
            self._initial_state = pickle.dumps(loop, protocol=pickle.HIGHEST_PROTOCOL)

    async def _run_generations(self) -> None:
        loop = self.loop
        grace = self.settings.grace_period
        deadline = loop.timer.arm()
        with anyio.CancelScope(deadline=deadline + grace) as run_scope:
            self._run_scope = run_scope
            loop.timer.on_change(self._move_deadline)
            if deadline <= anyio.current_time():
                self.stop_reason = "all_duration"
                return
            while await self._generation(deadline):
                pass
        # a step may have failed while the deadline was cancelling the generation
        self._raise_errors()
        if self.stop_reason is None and run_scope.cancelled_caught:
            self.stop_reason = "all_duration"
        if self.stop_reason == "all_duration":
            log.warning("all_duration is over: the run stops")

    def _raise_errors(self) -> None:
        """Raise what steps raised: one error as itself, several as an ExceptionGroup."""
        errors, self._errors = self._errors, []
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise BaseExceptionGroup("several steps failed independently", errors)

    def _move_deadline(self, deadline: float) -> None:
        self._run_scope.deadline = deadline + self.settings.grace_period
        if self._grace_scope is not None:
            self._grace_scope.deadline = deadline

    async def _generation(self, deadline: float) -> bool:
        """Run one generation; return True if another one must start (withdraw, resume)."""
        loop = self.loop
        if self.budget.exhausted:
            self.stop_reason = "step_n"
            return False
        n = len(loop.steps)
        self.unfinished = {li for li in range(loop.loop_idx) if loop.step_idx.get(li, 0) < n}
        self._withdraw = None
        self._restart = False
        exec_send, exec_recv = anyio.create_memory_object_stream[int](math.inf)
        self._receivers = []
        self._free_executors = self._backlog = 0
        try:
            async with anyio.create_task_group() as tg:
                self._gen_scope = tg.cancel_scope
                self._gen_tg = tg
                self._exec_recv = exec_recv
                tg.start_soon(self._kickoff, exec_send)
                if self.settings.grace_period > 0 and math.isfinite(deadline):
                    tg.start_soon(self._grace_watch, deadline)
        finally:
            # a task cancelled before it started never closed its stream
            exec_send.close()
            exec_recv.close()
            for receiver in self._receivers:
                receiver.close()
        self._grace_scope = None
        self._raise_errors()
        if self.stop_reason is not None:
            return False
        if self._withdraw is not None:
            self._restore(*self._withdraw)
            return True
        if self._restart:
            log.warning("LoopResumeError: every in-flight step stopped; starting again")
            return True
        self.stop_reason = "loop_n"
        return False

    # -- tasks ----------------------------------------------------------------------------

    async def _kickoff(self, exec_send: MemoryObjectSendStream[int]) -> None:
        loop = self.loop
        n = len(loop.steps)
        try:
            with exec_send:
                for li in sorted(self.unfinished):
                    self.progress.loop_admitted(li)
                    self._hand_over(exec_send, li)
                while loop.loop_n is None or loop.loop_n > 0:
                    while len(self.unfinished) >= self.max_parallel or self.closing:
                        await self.wait_loop_finished()
                    li = loop.loop_idx
                    self.unfinished.add(li)
                    loop.withdraw_base[li] = self.last_snapshot
                    loop.loop_prev_out[li][loop.LOOP_IDX_KEY] = li
                    self.progress.loop_admitted(li)
                    if not await self._run_step(li):
                        return
                    if loop.step_idx.get(li, 0) < n:
                        if self._gen_scope.cancel_called:
                            return  # the executors are stopping (or gone): so is this generation
                        self._hand_over(exec_send, li)
        except Exception as exc:  # a bug of ours: report it like a step error
            self._fail(exc)

    def _hand_over(self, exec_send: MemoryObjectSendStream[int], li: int) -> None:
        """Give loop ``li`` to an executor, starting one if none is free: at most
        ``max_parallel`` of them, and no more than there were loops to run at once."""
        if self._free_executors > 0:
            self._free_executors -= 1
        elif len(self._receivers) < self.max_parallel:
            assert self._exec_recv is not None
            assert self._gen_tg is not None
            receiver = self._exec_recv.clone()
            self._receivers.append(receiver)
            self._gen_tg.start_soon(self._executor, receiver)
        else:
            self._backlog += 1
        exec_send.send_nowait(li)

    async def _executor(self, exec_recv: MemoryObjectReceiveStream[int]) -> None:
        loop = self.loop
        n = len(loop.steps)
        try:
            with exec_recv:
                async for li in exec_recv:
                    while loop.step_idx.get(li, 0) < n:
                        if not await self._run_step(li):
                            return
                    if self._backlog:  # the next loop is waiting in the stream
                        self._backlog -= 1
                    else:
                        self._free_executors += 1
        except Exception as exc:
            self._fail(exc)

    async def _grace_watch(self, deadline: float) -> None:
        """At the deadline start no new step; cancel once in-flight steps are done."""
        with anyio.CancelScope(deadline=deadline) as scope:
            self._grace_scope = scope
            await anyio.sleep_forever()
        self.closing = True
        self.stop_reason = self.stop_reason or "all_duration"
        log.warning("all_duration is over: in-flight steps may finish within the grace period")
        self._notify_loop_finished()
        if self.in_flight == 0:
            self._run_scope.cancel("all_duration is over")

    # -- one step -------------------------------------------------------------------------

    async def _run_step(self, li: int) -> bool:
        """Run the next step of loop ``li``; return False when the generation must end."""
        loop = self.loop
        si = loop.step_idx.get(li, 0)
        name = loop.steps[si]
        async with self.limiters[name]:
            await self.budget.reserve()
            if self.closing:
                self.budget.release()
                await anyio.sleep_forever()
            self.running[name] += 1
            self.peak_running[name] = max(self.peak_running[name], self.running[name])
            self.in_flight += 1
            self.progress.step_started(li, si, name)
            log.debug(
                "loop %d step %d %s starts", li, si, name, extra={"loop_idx": li, "step_name": name}
            )
            started = _utcnow()
            try:
                with step_context(li, name):
                    output, attempts, retried = await self._call(li, si, name)
            except BaseException as exc:
                self.budget.release()
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                if isinstance(exc, Exception) and isinstance(exc, loop.skip_loop_error):
                    log.warning(
                        "loop %d step %s: %r, skipping ahead",
                        li,
                        name,
                        exc,
                        extra={"loop_idx": li, "step_name": name},
                    )
                    if not self._complete(li, si, name, None, exc, started, 1, ()):
                        return False
                else:
                    return self._step_failed(li, si, name, exc)
            else:
                if not self._complete(li, si, name, output, None, started, attempts, retried):
                    return False
            finally:
                self.running[name] -= 1
                self.in_flight -= 1
                if self.closing and self.in_flight == 0:
                    self._run_scope.cancel("all_duration is over")
        return await self._after_step(li, si, name)

    async def _call(
        self, li: int, si: int, name: str
    ) -> tuple[Any, int, tuple[BaseException, ...]]:
        """Call the step with its timeout and retry policies; return output, attempts, errors."""
        options = self.runner.options[name]  # the decorator wins over the settings
        timeout = self.settings.timeout_for(name) if options.timeout is None else options.timeout
        retries = self.settings.retries_for(name) if options.retries is None else options.retries
        retried: list[BaseException] = []
        prev_out = self.loop.loop_prev_out[li]
        while True:
            try:
                if timeout is None:
                    output = await self.runner.call(li, si, name, prev_out)
                else:
                    with anyio.move_on_after(timeout) as scope:
                        output = await self.runner.call(li, si, name, prev_out)
                    if scope.cancelled_caught:
                        raise StepTimeoutError(name, timeout)
                return output, len(retried) + 1, tuple(retried)
            except Exception as exc:
                control: tuple[type[BaseException], ...] = (
                    LoopTerminationError,
                    LoopResumeError,
                    *self.loop.withdraw_loop_error,
                )
                if (
                    len(retried) >= retries
                    or not isinstance(exc, options.retry_on)
                    or isinstance(exc, control)
                ):
                    raise
                retried.append(exc)
                delay = options.backoff * options.backoff_factor ** (len(retried) - 1)
                log.warning(
                    "loop %d step %s failed (%r); attempt %d of %d in %.3gs",
                    li,
                    name,
                    exc,
                    len(retried) + 1,
                    retries + 1,
                    delay,
                    extra={"loop_idx": li, "step_name": name},
                )
                await anyio.sleep(delay)

    def _complete(
        self,
        li: int,
        si: int,
        name: str,
        output: Any,
        exc: BaseException | None,
        started: datetime,
        attempts: int,
        retried: tuple[BaseException, ...],
    ) -> bool:
        """Record a finished step, all at once (no await), then save and publish it."""
        loop = self.loop
        n = len(loop.steps)
        ended = _utcnow()
        loop.loop_prev_out[li][name] = output
        if exc is not None:
            loop.loop_prev_out[li][loop.EXCEPTION_KEY] = exc
            target = loop.skip_target
            next_si = target if si < target else n
        else:
            next_si = si + 1
        loop.step_idx[li] = next_si
        loop.loop_trace[li].append(
            LoopTrace(started, ended, si, name, None if exc is None else repr(exc))
        )
        if si == 0 and li == loop.loop_idx:
            loop.loop_idx += 1
            if loop.loop_n is not None:
                loop.loop_n = max(0, loop.loop_n - 1)
        self.budget.spend()
        loop.step_n = self.budget.remaining
        self.steps_completed += 1
        if next_si >= n:
            self.unfinished.discard(li)
            self.finished_loops.add(li)
            self._notify_loop_finished()
            self.progress.loop_finished(li)
        if self.settings.save_snapshots:
            path = self._loop_folder(li, finished=next_si >= n) / f"{si}_{name}"
            try:
                loop.dump(path)
            except Exception as error:
                add_note(error, f"while saving the snapshot {path} after loop {li} step {name!r}")
                self._fail(error)
                return False
            self.last_snapshot = f"{li}/{si}_{name}"
        result = StepResult(li, si, name, output, exc, started, ended, attempts, retried)
        if self.stream_results:
            self._pending.append(result)
            self._pending_changed.set()
        self.progress.step_finished(result)
        log.info("%s", result, extra={"loop_idx": li, "step_name": name})
        return True

    def _loop_folder(self, li: int, *, finished: bool) -> Path:
        """``<session>/<li>``, built once per loop: pathlib's joins are slow."""
        session = self.loop.session_folder
        known = self._loop_folders.pop(li, None) if finished else self._loop_folders.get(li)
        if known is not None and known[0] is session:
            return known[1]
        folder = session / str(li)
        if not finished:
            self._loop_folders[li] = (session, folder)
        return folder

    async def _after_step(self, li: int, si: int, name: str) -> bool:
        try:
            self.loop._check_exit_conditions_on_step(li, si)
        except LoopTerminationError as exc:
            log.warning("loop %d step %s: %s; the run stops", li, name, exc)
            self._stop("terminated")
            return False
        except Exception as exc:
            add_note(exc, f"raised by _check_exit_conditions_on_step after loop {li} step {name!r}")
            self._fail(exc)
            return False
        if self.budget.exhausted:
            self._stop("step_n")
            return False
        # backpressure: a slow consumer slows the engine down instead of growing memory
        while len(self._pending) > self.settings.result_buffer:
            await self._room.wait()
        return True

    def _step_failed(self, li: int, si: int, name: str, exc: BaseException) -> bool:
        loop = self.loop
        if isinstance(exc, LoopTerminationError):
            log.warning("loop %d step %s: %s; the run stops", li, name, exc)
            self._stop("terminated")
        elif isinstance(exc, LoopResumeError):
            self._restart = True
            self._gen_scope.cancel("LoopResumeError")
        elif isinstance(exc, Exception) and isinstance(exc, loop.withdraw_loop_error):
            log.warning(
                "loop %d step %s: %r; withdrawing",
                li,
                name,
                exc,
                extra={"loop_idx": li, "step_name": name},
            )
            if self._withdraw is None:
                self._withdraw = (li, exc)
            self._gen_scope.cancel("withdraw")
        else:
            add_note(exc, f"raised by loop {li}, step {si} ({name!r})")
            self._fail(exc)
        return False

    def _fail(self, exc: BaseException) -> None:
        self._errors.append(exc)
        self._gen_scope.cancel("a step failed")

    def _stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._gen_scope.cancel(f"stopped by {reason}")

    # -- withdraw -------------------------------------------------------------------------

    def _restore(self, li: int, exc: BaseException) -> None:
        """Roll every loop back to the newest snapshot written before loop ``li`` started."""
        loop = self.loop
        base = loop.withdraw_base.get(li)
        restored: LoopBase | None = None
        if base is not None and self.settings.save_snapshots:
            path = loop.session_folder / base
            self.snapshot_writer.flush()  # the snapshot to restore must be on disk
            kwargs: dict[str, Any] = {"checkout": False, "replace_timer": False}
            params = inspect.signature(type(loop).load).parameters
            if "settings" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                kwargs["settings"] = loop.settings
            try:
                restored = type(loop).load(path, **kwargs)
            except (OSError, SnapshotError) as error:
                log.warning("cannot restore %s (%s); restoring the run's start", path, error)
        if restored is None:
            assert self._initial_state is not None
            restored = pickle.loads(self._initial_state)
            base = None
        kept = {
            "timer": loop.timer,
            "settings": loop.settings,
            "session_folder": loop.session_folder,
            "step_n": loop.step_n,
            "_run_state": self,
        }
        state = dict(restored.__dict__)
        state.update(kept)
        loop.__dict__.clear()
        loop.__dict__.update(state)
        n = len(loop.steps)
        self.finished_loops = {i for i in self.finished_loops if loop.step_idx.get(i, 0) >= n}
        if base is not None:
            # make the restored state the newest snapshot, so a crash now resumes from it
            loop.dump(loop.session_folder / base)
        self.last_snapshot = base
        log.warning(
            "withdrew loop %d after %r: restored %s; starting a new generation",
            li,
            exc,
            base or "the state at the start of the run",
        )

    # -- results --------------------------------------------------------------------------

    async def _forward(self, send: MemoryObjectSendStream[StepResult]) -> None:
        """Hand completed results to the consumer, in completion order.

        It lives outside the run's cancel scopes, so a result that was recorded is never
        lost to a deadline or a budget stop.
        """
        while True:
            while not self._pending:
                if self._finished:
                    return
                self._pending_changed = anyio.Event()
                await self._pending_changed.wait()
            # when nobody listens any more, keep draining so steps are not held up
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await send.send(self._pending[0])
            self._pending.popleft()
            self._room.set()
            self._room = anyio.Event()


class ResultStream(AsyncIterator[StepResult]):
    """The receive side of a run: async-iterate it for ``StepResult``s.

    Engine errors are raised from ``__anext__`` as themselves once the results before them
    have been received. ``summary`` is set once the stream is exhausted.
    """

    def __init__(self, receive: MemoryObjectReceiveStream[StepResult], outcome: _Outcome) -> None:
        self._receive = receive
        self._outcome = outcome

    def __aiter__(self) -> ResultStream:
        return self

    async def __anext__(self) -> StepResult:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            pass
        outcome = self._outcome
        if outcome.error is not None and not outcome.delivered:
            outcome.delivered = True
            raise outcome.error
        raise StopAsyncIteration

    @property
    def summary(self) -> RunSummary | None:
        return self._outcome.summary

    def close(self) -> None:
        self._receive.close()


class LoopRun(Coroutine[Any, Any, RunSummary]):
    """What ``loop.run(...)`` returns; consume it once, in one of three ways.

    * ``await loop.run(...)`` (also ``asyncio.run(loop.run(...))``, ``trio.run(loop.run)``)
      returns a :class:`RunSummary`;
    * ``async with loop.run(...) as results: async for r in results`` — the structured form,
      preferred: the engine's task group lives inside the block;
    * ``async for r in loop.run(...)`` — the engine runs beside the caller and stops as soon
      as the iterator is left or dropped.
    """

    def __init__(
        self,
        loop: LoopBase,
        *,
        step_n: int | None,
        loop_n: int | None,
        all_duration: timedelta | None,
    ) -> None:
        self._loop = loop
        self._args = {"step_n": step_n, "loop_n": loop_n, "all_duration": all_duration}
        self._state: RunState | None = None
        self._consumed: str | None = None
        self._coro: Coroutine[Any, Any, RunSummary] | None = None
        self._tg: TaskGroup | None = None
        self._results: ResultStream | None = None
        self._send: MemoryObjectSendStream[StepResult] | None = None
        self._outcome = _Outcome()
        self._stream_results = True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._args.items() if v is not None)
        return f"<LoopRun of {type(self._loop).__name__}({args})>"

    def _claim(self, form: str) -> RunState:
        if self._consumed is not None:
            raise RuntimeError(
                f"this run was already consumed with {self._consumed}; call loop.run() again"
            )
        state = RunState(self._loop, **self._args)  # type: ignore[arg-type]
        state.stream_results = self._stream_results
        state.claim()
        self._consumed = form
        self._state = state
        return state

    def statistics(self) -> RunStatistics:
        if self._state is None:
            raise RuntimeError("the run has not started")
        return self._state.statistics()

    # -- await ----------------------------------------------------------------------------

    def _coroutine(self) -> Coroutine[Any, Any, RunSummary]:
        if self._coro is None:
            self._coro = self._await_summary()
        return self._coro

    async def _await_summary(self) -> RunSummary:
        self._stream_results = False  # only the summary is wanted: results are not queued
        async with self as results:
            async for _ in results:
                pass
        assert self._outcome.summary is not None
        return self._outcome.summary

    def __await__(self) -> Generator[Any, None, RunSummary]:
        return self._coroutine().__await__()

    def send(self, value: Any) -> Any:
        return self._coroutine().send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coroutine().throw(typ)
        return self._coroutine().throw(typ, val, tb)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    # -- async with -----------------------------------------------------------------------

    async def __aenter__(self) -> ResultStream:
        state = self._claim("async with")
        send, receive = anyio.create_memory_object_stream[StepResult](
            self._loop.settings.result_buffer
        )
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._send = send
        tg.start_soon(_drive, state, send, self._outcome)
        self._results = ResultStream(receive, self._outcome)
        return self._results

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg = self._tg
        assert tg is not None
        self._tg = None
        if exc is not None or not self._outcome.done.is_set():
            tg.cancel_scope.cancel("the consumer left the run")
            # the engine is cancelled already: waiting for it must not be cut short
            tg.cancel_scope.shield = True
        # close the task group without handing it the body's exception (trio would wrap it
        # in an ExceptionGroup); the body's exception then propagates as itself
        try:
            await tg.__aexit__(None, None, None)
        finally:
            # also when the engine was cancelled before it started
            if self._state is not None:
                self._state.release()
            if self._results is not None:
                self._results.close()
            if self._send is not None:
                self._send.close()
        outcome = self._outcome
        if exc is None and outcome.error is not None and not outcome.delivered:
            outcome.delivered = True
            raise outcome.error
        return False

    # -- async for ------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[StepResult]:
        return _DetachedIterator(self._claim("async for"), self._outcome)


async def _drive(
    state: RunState, send: MemoryObjectSendStream[StepResult], outcome: _Outcome
) -> None:
    """Run the engine, store how it ended, then close the result stream."""
    try:
        with send:
            try:
                outcome.summary = await state.main(send)
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                outcome.error = exc
    finally:
        outcome.done.set()


class _DetachedIterator(AsyncIterator[StepResult]):
    """The bare ``async for`` form, PEP 789-safe.

    The engine runs in a detached task, outside every cancel scope of the consumer, so its
    cancellation can never land in the consumer's code between items. The iterator owns the
    engine's lifetime: leaving it (``break``, an exception, being cancelled, being dropped)
    cancels the engine at once.
    """

    def __init__(self, state: RunState, outcome: _Outcome) -> None:
        self._state = state
        self._outcome = outcome
        send, receive = anyio.create_memory_object_stream[StepResult](state.settings.result_buffer)
        self._unsent = [send]  # the send side, until the engine starts and owns it
        self._started = False
        self._results = ResultStream(receive, outcome)
        self._scope = anyio.CancelScope()
        weakref.finalize(self, _stop_detached, self._scope, receive, self._unsent, state)

    def __aiter__(self) -> _DetachedIterator:
        return self

    async def __anext__(self) -> StepResult:
        if not self._started:
            self._started = True
            send = self._unsent.pop()
            spawn_detached(_detached_main(self._state, send, self._outcome, self._scope))
        try:
            return await self._results.__anext__()
        except BaseException:
            self._scope.cancel()
            raise

    @property
    def summary(self) -> RunSummary | None:
        """The run's summary, once the iteration is over."""
        return self._outcome.summary

    async def aclose(self) -> None:
        """Stop the engine and wait until it has stopped."""
        self._scope.cancel()
        self._results.close()
        for send in self._unsent:
            send.close()
        if not self._started:
            self._state.release()
        else:
            with anyio.CancelScope(shield=True):
                await self._outcome.done.wait()


def _stop_detached(
    scope: anyio.CancelScope,
    receive: MemoryObjectReceiveStream[Any],
    unsent: list[MemoryObjectSendStream[Any]],
    state: RunState,
) -> None:
    receive.close()
    for send in unsent:
        send.close()
        state.release()  # never started
    with contextlib.suppress(RuntimeError):  # the event loop is already gone
        scope.cancel()


def _detached_main(
    state: RunState,
    send: MemoryObjectSendStream[StepResult],
    outcome: _Outcome,
    scope: anyio.CancelScope,
) -> Any:
    async def main() -> None:
        try:
            with scope:
                await _drive(state, send, outcome)
        except BaseException as exc:  # a detached task must not raise
            if outcome.error is None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                outcome.error = exc
        finally:
            state.release()
            outcome.done.set()

    return main
