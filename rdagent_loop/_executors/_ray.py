"""The ``ray`` executor: a step runs as a Ray task, for when one machine is not enough.

Ray is optional (``pip install 'rdagent_loop[ray]'``) and imported only when a step asks
for it. The executor joins the application's Ray session if it has one, else connects to
``LoopSettings.ray_address``, else starts a local cluster; it shuts down only what it
started. A step asks for ``num_cpus``, ``num_gpus``, ``memory`` and custom ``resources``
with ``@step(...)``; Ray places it on a node that has them.

The step is shipped as one cloudpickle of ``(bound method, prev_out)`` (so loop classes of
the main script travel by value), works on a copy of ``self`` like a process step, and its
return value comes back. An exception comes back as itself. The result is awaited in a
thread, so it works under asyncio and trio; cancelling the step calls
``ray.cancel(force=True)``, which kills the worker process running it. Ray's own retries are
off: the engine's ``retries`` policy decides.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

import anyio

from .._compat import add_note
from .._settings import LoopSettings, StepResources
from ._base import StepCall
from ._wire import RemoteTraceback

log = logging.getLogger("rdagent_loop")

_MISSING = "the 'ray' executor needs Ray: pip install 'rdagent_loop[ray]'"


def check_ray_installed() -> None:
    """Fail when the run starts, not at the first Ray step, if Ray is missing."""
    import_ray()


def import_ray() -> ModuleType:
    try:
        return importlib.import_module("ray")  # a ModuleType whether or not Ray is installed
    except ImportError as exc:
        raise ImportError(_MISSING, name="ray") from exc


def _run_shipped_step(payload: bytes) -> Any:
    """The Ray task: unpickle the bound method and ``prev_out``, call it."""
    from ray import cloudpickle

    func, prev_out = cloudpickle.loads(payload)
    return func(prev_out)


class RayExecutor:
    def __init__(self, settings: LoopSettings) -> None:
        self._address = settings.ray_address
        self._resources = settings.step_resources
        self._num_cpus = max(os.cpu_count() or 1, settings.max_parallel)
        self._ray: ModuleType | None = None
        self._task: Any = None
        self._owns_session = False
        self._lock: anyio.Lock | None = None

    async def _connect(self) -> ModuleType:
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._ray is None:
                ray = import_ray()
                if not ray.is_initialized():
                    kwargs: dict[str, Any]
                    if self._address is not None:
                        kwargs = {"address": self._address}
                    else:
                        kwargs = {"num_cpus": self._num_cpus, "include_dashboard": False}
                    # not abandonable: a half-started cluster must not outlive the run
                    await anyio.to_thread.run_sync(lambda: ray.init(**kwargs))
                    self._owns_session = True
                    log.info("ray: connected to %s", self._address or "a new local cluster")
                self._task = ray.remote(_run_shipped_step)
                self._ray = ray
        return self._ray

    async def run(self, call: StepCall) -> Any:
        ray = await self._connect()
        try:
            payload = ray.cloudpickle.dumps((call.func, call.prev_out))
        except Exception as exc:
            add_note(exc, f"while sending {call.describe()} to Ray: self and prev_out must pickle")
            raise
        ref = self._task.options(**task_options(call, self._resources.get(call.name))).remote(
            payload
        )
        del payload
        try:
            return await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            ray.cancel(ref, force=True)
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if not isinstance(cause, BaseException):
                raise
            cause.__cause__ = RemoteTraceback(str(exc))
            raise cause from cause.__cause__
        except ray.exceptions.RayError as exc:
            add_note(exc, f"while running {call.describe()} as a Ray task")
            raise

    async def aclose(self) -> None:
        ray, self._ray = self._ray, None
        if ray is not None and self._owns_session:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(ray.shutdown)


def task_options(call: StepCall, configured: StepResources | None = None) -> dict[str, Any]:
    """Ray task options of a step: ``@step(...)`` first, then ``LoopSettings.step_resources``."""
    options = call.options
    fallback = configured or StepResources()
    task: dict[str, Any] = {
        "name": f"{call.name}[loop {call.loop_idx}]",
        "max_retries": 0,
        "retry_exceptions": False,
    }
    for field in ("num_cpus", "num_gpus", "memory"):
        value = getattr(options, field)
        if value is None:
            value = getattr(fallback, field)
        if value is not None:
            task[field] = value
    resources = {**fallback.resources, **(options.resources or {})}
    if resources:
        task["resources"] = resources
    return task
