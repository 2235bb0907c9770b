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

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._settings import ExecutorName
from .._steps import StepOptions, step_options
from ._base import Executor, StepCall
from ._inline import InlineExecutor
from ._select import choose_executors
from ._thread import ThreadExecutor

if TYPE_CHECKING:
    from .._loop import LoopBase

__all__ = ("Executor", "StepCall", "StepRunner")


class StepRunner:
    """Runs step functions for one ``run()``; lives as long as the run (across generations).

    ``executors`` replaces the built-in executor of a name (a fake in tests); the runner
    closes only the executors it created itself.
    """

    def __init__(
        self, loop: LoopBase, executors: Mapping[ExecutorName, Executor] | None = None
    ) -> None:
        self.loop = loop
        self.settings = loop.settings
        cls = type(loop)
        self.choice = choose_executors(cls, loop.steps, self.settings)
        self.options: dict[str, StepOptions] = {
            name: step_options(getattr(cls, name)) for name in loop.steps
        }
        self._given: dict[ExecutorName, Executor] = dict(executors or {})
        self._owned: dict[ExecutorName, Executor] = {}
        if "ray" in self.choice.values() and "ray" not in self._given:
            from ._ray import check_ray_installed

            check_ray_installed()

    def executor_of(self, name: str) -> ExecutorName:
        """The name of the executor that runs step ``name``."""
        return self.choice[name]

    async def __aenter__(self) -> StepRunner:
        if "process" in self.choice.values() and "process" not in self._given:
            from ._process import ProcessExecutor

            pool = self._executor("process")
            if isinstance(pool, ProcessExecutor):
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
        owned, self._owned = list(self._owned.values()), {}
        errors: list[BaseException] = []
        for executor in owned:
            try:
                await executor.aclose()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def call(self, loop_idx: int, step_idx: int, name: str, prev_out: dict[str, Any]) -> Any:
        """Run step ``name`` of loop ``loop_idx`` where it belongs and return its output."""
        func = getattr(self.loop, name)
        call = StepCall(loop_idx, step_idx, name, func, prev_out, self.options[name])
        return await self._executor(self.choice[name]).run(call)

    def _executor(self, kind: ExecutorName) -> Executor:
        executor = self._given.get(kind) or self._owned.get(kind)
        if executor is None:
            executor = self._owned[kind] = self._create(kind)
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
