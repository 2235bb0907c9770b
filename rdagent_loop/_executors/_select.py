"""Which executor runs each step, decided once when a run starts.

Precedence: ``@step(executor=...)`` on the method, then ``LoopSettings.step_executor`` (a
name for every sync step, or a dict from step name to name), then RD-Agent's rule: inline
when nothing runs in parallel (``max_parallel == 1`` and not ``subproc_step``); otherwise
sync steps go to ``process``, except the first step (run by the kickoff) and the last step
(usually ``record``, which writes shared state), which stay inline.

Async steps are always awaited on the event loop: naming another executor for one is an
error, at class definition (``@step``) or when the run starts (settings).
"""

from __future__ import annotations

import inspect
from typing import Any

from .._settings import ExecutorName, LoopSettings
from .._steps import step_options


def is_async_step(func: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(func, "__func__", func))


def choose_executors(
    cls: type[Any], steps: list[str], settings: LoopSettings
) -> dict[str, ExecutorName]:
    """Map every step of ``cls`` to the executor that runs it; refuse contradictions."""
    # also here, not only in LoopBase.__init__: load(settings=...) gives a loop new settings
    settings.check_step_names(cls.__name__, steps)
    configured = settings.step_executor
    chosen: dict[str, ExecutorName] = {}
    last = len(steps) - 1
    for idx, name in enumerate(steps):
        func = getattr(cls, name)
        declared = step_options(func).executor
        by_settings = configured.get(name) if isinstance(configured, dict) else configured
        if is_async_step(func):
            explicit = declared or (by_settings if isinstance(configured, dict) else None)
            if explicit not in (None, "inline"):
                raise TypeError(
                    f"step_executor asks for {explicit!r} for {cls.__name__}.{name}, an async "
                    "step: async steps are awaited on the event loop; make it sync to run it "
                    "elsewhere"
                )
            chosen[name] = "inline"
        elif declared is not None:
            chosen[name] = declared
        elif by_settings is not None:
            chosen[name] = by_settings
        elif settings.is_force_subproc() and 0 < idx < last:
            chosen[name] = "process"
        else:
            chosen[name] = "inline"
    return chosen
