"""The run handle: what ``loop.run(...)`` returns, consumed in one of three forms.

* ``await`` (also ``asyncio.run(loop.run(...))``, ``trio.run(loop.run)``): the run, then its
  :class:`RunSummary`; nobody reads the results, so none is kept;
* ``async with ... as results``: the structured form; the engine's task group lives inside
  the block;
* ``async for``: the engine runs in a detached task tied to the iterator, and stops as soon
  as the iterator is left or dropped (PEP 789-safe: its cancellation never lands in the
  consumer's code).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ._backend import spawn_detached
from ._otel import trace_run
from ._outlet import DiscardOutlet, Item, ResultOutlet
from ._progress import make_progress
from ._results import RunSummary
from ._run import Run, RunStatistics

if TYPE_CHECKING:
    from ._loop import LoopBase


@dataclass
class _Outcome:
    """How the engine ended, shared between the driver task and the consumer."""

    summary: RunSummary | None = None
    error: BaseException | None = None
    delivered: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)


class ResultStream(AsyncIterator[Item]):
    """The receive side of a run: async-iterate it for ``StepResult``s, and the
    ``Question``s steps ask (``loop.ask``), which ``answer`` answers.

    Engine errors are raised from ``__anext__`` as themselves once the results before them
    have been received. ``summary`` is set once the stream is exhausted.
    """

    def __init__(self, run: Run, outcome: _Outcome) -> None:
        self._run = run
        self._outlet = run.outlet
        self._outcome = outcome

    def __aiter__(self) -> ResultStream:
        return self

    def answer(self, question_id: str, value: Any) -> None:
        """Answer the open question ``question_id`` of this run: the answer is journaled,
        then the waiting step goes on. ``KeyError`` naming the id if no such question is
        open (unknown, or answered already)."""
        self._run.journal.answer(question_id, value)

    async def __anext__(self) -> Item:
        progress = self._outlet.progress
        progress.resume()  # the consumer waits: the bar may show
        try:
            result = await self._outlet.receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            progress.close()
        else:
            self._outlet.taken(result)
            progress.pause()  # the consumer may print: its lines stay whole
            return result
        outcome = self._outcome
        if outcome.error is not None and not outcome.delivered:
            outcome.delivered = True
            raise outcome.error
        raise StopAsyncIteration

    @property
    def summary(self) -> RunSummary | None:
        return self._outcome.summary

    def close(self) -> None:
        self._outlet.close()


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
        all_cost: float | None = None,
    ) -> None:
        self._loop = loop
        self._args: dict[str, Any] = {
            "step_n": step_n,
            "loop_n": loop_n,
            "all_duration": all_duration,
            "all_cost": all_cost,
        }
        self._run: Run | None = None
        self._consumed: str | None = None
        self._coro: Coroutine[Any, Any, RunSummary] | None = None
        self._tg: TaskGroup | None = None
        self._results: ResultStream | None = None
        self._outcome = _Outcome()
        # RD-Agent's kaggle app calls loop.run(...) without awaiting it: say so when such a
        # handle is dropped. The finalizer holds only a string, so it keeps nothing alive.
        self._arguments = ", ".join(f"{k}={v!r}" for k, v in self._args.items() if v is not None)
        call = f"{type(loop).__name__}.run({self._arguments})"
        self._unused = weakref.finalize(self, LoopRun._warn_unused, call)

    def __repr__(self) -> str:
        return f"<LoopRun of {type(self._loop).__name__}({self._arguments})>"

    @staticmethod
    def _warn_unused(call: str) -> None:
        warnings.warn(
            f"{call} was never awaited, entered or iterated: nothing ran",
            RuntimeWarning,
            stacklevel=3,  # past weakref.finalize: the line that dropped the handle
        )

    def _used(self) -> None:
        """The handle was awaited, entered, iterated or closed: no warning when it goes."""
        self._unused.detach()

    def _claim(self, form: str) -> Run:
        """Build the engine for this form of consumption, and mark the loop as running."""
        self._used()
        if self._consumed is not None:
            raise RuntimeError(
                f"this run was already consumed with {self._consumed}; call loop.run() again"
            )
        loop = self._loop
        if loop._running:
            raise RuntimeError(f"{type(loop).__name__} is already running; one run() at a time")
        settings = loop.settings
        step_n, loop_n = self._args["step_n"], self._args["loop_n"]
        total = (
            step_n
            if isinstance(step_n, int)
            else loop_n * len(loop.steps)
            if isinstance(loop_n, int) and loop_n
            else None
        )
        progress = make_progress(total, enabled=settings.progress)
        outlet = (
            DiscardOutlet(progress)
            if form == "await"
            else ResultOutlet(settings.result_buffer, settings.max_parallel, progress)
        )
        try:
            run = Run(loop, outlet, **self._args)
        except BaseException:  # refused (bad settings...): leave no open stream behind
            outlet.close()
            raise
        loop._running = True
        self._consumed = form
        self._run = run
        return run

    def _release(self) -> None:
        """The loop may run again (once the engine is done, or if it never started)."""
        self._loop._running = False

    def statistics(self) -> RunStatistics:
        if self._run is None:
            raise RuntimeError("the run has not started")
        return self._run.statistics()

    def answer(self, question_id: str, value: Any) -> None:
        """Answer an open question of this run (see ``ResultStream.answer``)."""
        if self._run is None:
            raise KeyError(f"no open question {question_id!r}: the run has not started")
        self._run.journal.answer(question_id, value)

    # -- await ----------------------------------------------------------------------------

    def _coroutine(self) -> Coroutine[Any, Any, RunSummary]:
        self._used()
        if self._coro is None:
            self._coro = self._await_summary()
        return self._coro

    async def _await_summary(self) -> RunSummary:
        results = await self._open(self._claim("await"))
        try:
            async for _ in results:
                pass
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await self.__aexit__(None, None, None)
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
        self._used()  # like a coroutine's close(): the caller chose not to run it
        if self._coro is not None:
            self._coro.close()

    # -- async with -----------------------------------------------------------------------

    async def __aenter__(self) -> ResultStream:
        return await self._open(self._claim("async with"))

    async def _open(self, run: Run) -> ResultStream:
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(_drive, run, self._outcome)
        self._results = ResultStream(run, self._outcome)
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
            self._release()
            if self._run is not None:
                self._run.outlet.close()
        outcome = self._outcome
        if exc is None and outcome.error is not None and not outcome.delivered:
            outcome.delivered = True
            raise outcome.error
        return False

    # -- async for ------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Item]:
        return _DetachedIterator(self._claim("async for"), self._outcome, self._release)


async def _drive(run: Run, outcome: _Outcome) -> None:
    """Run the engine, store how it ended, then close the result stream."""
    try:
        with run.outlet.send:
            try:
                with trace_run(run):  # OpenTelemetry: the run's span, when traced
                    outcome.summary = await run.main()
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:
                outcome.error = exc
    finally:
        outcome.done.set()


class _DetachedIterator(AsyncIterator[Item]):
    """The bare ``async for`` form, PEP 789-safe.

    The engine runs in a detached task, outside every cancel scope of the consumer, so its
    cancellation can never land in the consumer's code between items. The iterator owns the
    engine's lifetime: leaving it (``break``, an exception, being cancelled, being dropped)
    cancels the engine at once.
    """

    def __init__(self, run: Run, outcome: _Outcome, release: Callable[[], None]) -> None:
        self._run = run
        self._outcome = outcome
        self._release = release
        self._started = False
        self._results = ResultStream(run, outcome)
        self._scope = anyio.CancelScope()
        self._never_started = weakref.finalize(self, _never_started, run.outlet, release)
        weakref.finalize(self, _stop, self._scope, run.outlet)

    def __aiter__(self) -> _DetachedIterator:
        return self

    def answer(self, question_id: str, value: Any) -> None:
        """Answer an open question of this run (see ``ResultStream.answer``)."""
        self._results.answer(question_id, value)

    async def __anext__(self) -> Item:
        if not self._started:
            self._started = True
            self._never_started.detach()
            spawn_detached(_detached_main(self._run, self._outcome, self._scope, self._release))
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
        if not self._started:
            self._never_started()
        else:
            with anyio.CancelScope(shield=True):
                await self._outcome.done.wait()


def _never_started(outlet: ResultOutlet, release: Callable[[], None]) -> None:
    outlet.close()
    release()


def _stop(scope: anyio.CancelScope, outlet: ResultOutlet) -> None:
    outlet.close()
    with contextlib.suppress(RuntimeError):  # the event loop is already gone
        scope.cancel()


def _detached_main(
    run: Run, outcome: _Outcome, scope: anyio.CancelScope, release: Callable[[], None]
) -> Callable[[], Awaitable[None]]:
    async def main() -> None:
        try:
            with scope:
                await _drive(run, outcome)
        except BaseException as exc:  # a detached task must not raise
            if outcome.error is None and not isinstance(exc, anyio.get_cancelled_exc_class()):
                outcome.error = exc
        finally:
            release()
            outcome.done.set()

    return main
