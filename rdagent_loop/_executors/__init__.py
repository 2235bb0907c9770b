"""Step executors: where a step's function runs.

* ``inline`` — on the event loop's thread; async steps always run here (awaited).
* ``thread`` — a worker thread; it shares ``self`` with the event loop and with other
  thread steps, so a thread step should change ``self`` only under its own lock, or not
  at all (return what it made, and let an inline step apply it).
* ``process`` — a reusable pool of killable worker processes (:mod:`._process`).
* ``ray`` — a Ray task, on this machine or a cluster (:mod:`._ray`).

**Process and Ray steps work on a copy of the loop object**: their changes to ``self``
never come back, only their return value does (as in RD-Agent). Which executor runs each
step is decided when the run starts (:mod:`._select`); the executors a run uses live as long
as the run, across generations, and are shut down when it ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._errors import LoopResumeError, LoopTerminationError
from .._settings import ExecutorName, LoopSettings
from .._steps import StepOptions, step_options
from ._base import Executor, StepCall, StepTiming
from ._inline import InlineExecutor
from ._select import choose_executors, is_async_step
from ._thread import ThreadExecutor

if TYPE_CHECKING:
    from .._loop import LoopBase

__all__ = ("Executor", "StepCall", "StepRunner", "StepTiming")


class StepRunner:
    """Runs step functions for one ``run()``; lives as long as the run (across generations).

    It holds each step's policies (executor, limit, timeout, retries: the ``@step`` decorator
    wins over the settings) and the executors the run uses, created as steps first need them.
    """

    def __init__(self, loop_class: type[LoopBase], settings: LoopSettings) -> None:
        steps = loop_class.steps
        self.settings = settings
        self.choice = choose_executors(loop_class, steps, settings)
        self.options: dict[str, StepOptions] = {
            name: step_options(getattr(loop_class, name)) for name in steps
        }
        self.is_async = {name: is_async_step(getattr(loop_class, name)) for name in steps}
        self.timeouts: dict[str, float | None] = {
            name: settings.timeout_for(name) if o.timeout is None else o.timeout
            for name, o in self.options.items()
        }
        self.retries: dict[str, int] = {
            name: settings.retries_for(name) if o.retries is None else o.retries
            for name, o in self.options.items()
        }
        # the engine's control errors: a retry policy never swallows them
        self.never_retried: tuple[type[BaseException], ...] = (
            LoopTerminationError,
            LoopResumeError,
            *loop_class.withdraw_loop_error,
        )
        self._executors: dict[ExecutorName, Executor] = {}
        if "ray" in self.choice.values():
            from ._ray import check_ray_installed

            check_ray_installed()

    async def __aenter__(self) -> StepRunner:
        if "process" in self.choice.values():
            from ._process import ProcessExecutor

            pool = self._executor("process")
            assert isinstance(pool, ProcessExecutor)
            pool.prestart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every executor this runner started, even if closing one of them fails."""
        executors, self._executors = list(self._executors.values()), {}
        errors: list[BaseException] = []
        for executor in executors:
            try:
                await executor.aclose()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def call(
        self,
        loop_idx: int,
        step_idx: int,
        name: str,
        func: Callable[..., Any],
        prev_out: dict[str, Any],
        timing: StepTiming,
    ) -> Any:
        """Run ``func``, step ``name`` of loop ``loop_idx``, where it belongs; return its output."""
        call = StepCall(loop_idx, step_idx, name, func, prev_out, self.options[name], timing)
        return await self._executor(self.choice[name]).run(call)

    def _executor(self, kind: ExecutorName) -> Executor:
        executor = self._executors.get(kind)
        if executor is None:
            executor = self._executors[kind] = self._create(kind)
        return executor

    def _create(self, kind: ExecutorName) -> Executor:
        if kind == "inline":
            return InlineExecutor()
        if kind == "thread":
            return ThreadExecutor(self.limit_of)
        if kind == "process":
            from ._process import ProcessExecutor

            return ProcessExecutor(self.settings.process_workers or self.settings.max_parallel)
        from ._ray import RayExecutor

        return RayExecutor(self.settings)

    def limit_of(self, name: str) -> int:
        """How many instances of step ``name`` may run at once (``@step(limit=)`` wins)."""
        return self.options[name].limit or self.settings.step_limit(name)
