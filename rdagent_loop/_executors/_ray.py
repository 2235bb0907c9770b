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

A step's calls to the step journal (``memo_blocking``, ``ask_blocking``) reach the engine
through a mailbox: a small async Ray actor, one per run, wherever the task runs. The task
puts a request under its call's token and waits for the answer; the engine, while it awaits
the step, takes that token's requests (in a thread, like the result) and answers them.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
from types import ModuleType
from typing import Any

import anyio

from .._compat import add_note
from .._journal import RequestPort, StepJournal, current_step, serve
from .._otel import attached, carrier
from .._settings import LoopSettings, StepResources
from ._base import StepCall
from ._wire import RemoteTraceback

log = logging.getLogger("rdagent_loop")

_MISSING = "the 'ray' executor needs Ray: pip install 'rdagent_loop[ray]'"
_FAILED = object()  # marks the outcome of a task that raised


def check_ray_installed() -> None:
    """Fail when the run starts, not at the first Ray step, if Ray is missing."""
    import_ray()


def import_ray() -> ModuleType:
    try:
        return importlib.import_module("ray")  # a ModuleType whether or not Ray is installed
    except ImportError as exc:
        raise ImportError(_MISSING, name="ray") from exc


def _run_shipped_step(
    payload: bytes, mailbox: Any, token: int, trace_context: dict[str, str] | None = None
) -> Any:
    """The Ray task: unpickle the bound method and ``prev_out``, call it; its journal calls
    go to the engine through ``mailbox``, and the step's span (``trace_context``) is the
    current span while it runs."""
    from ray import cloudpickle

    from .. import _journal

    func, prev_out = cloudpickle.loads(payload)
    _journal.remote_port = _MailboxPort(mailbox, token)
    try:
        with attached(trace_context):
            return func(prev_out)
    finally:
        _journal.remote_port = None


class _MailboxPort(RequestPort):
    """The step journal, as a step in a Ray task reaches it."""

    def __init__(self, mailbox: Any, token: int) -> None:
        self.mailbox = mailbox
        self.token = token

    def _call(self, *request: Any) -> Any:
        import ray

        ok, value = ray.get(self.mailbox.call.remote(self.token, request))
        if not ok:
            raise value
        return value


class _Mailbox:
    """A Ray actor (async) between running steps and the engine: requests by call token."""

    def __init__(self) -> None:
        self.requests: dict[int, Any] = {}  # token -> asyncio.Queue of (request id, request)
        self.waiting: dict[int, Any] = {}  # request id -> asyncio.Future of the answer
        self.next_id = 0

    def _queue(self, token: int) -> Any:
        import asyncio

        queue = self.requests.get(token)
        if queue is None:
            queue = self.requests[token] = asyncio.Queue()
        return queue

    async def call(self, token: int, request: Any) -> Any:
        import asyncio

        self.next_id += 1
        answer = self.waiting[self.next_id] = asyncio.get_running_loop().create_future()
        await self._queue(token).put((self.next_id, request))
        return await answer

    async def next_request(self, token: int) -> Any:
        """The next request of call ``token``; None once the call is over."""
        return await self._queue(token).get()

    async def answer(self, request_id: int, answer: Any) -> None:
        future = self.waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(answer)

    async def close(self, token: int) -> None:
        queue = self.requests.pop(token, None)
        if queue is not None:
            queue.put_nowait(None)


class RayExecutor:
    def __init__(self, settings: LoopSettings) -> None:
        self._address = settings.ray_address
        self._resources = settings.step_resources
        self._num_cpus = max(os.cpu_count() or 1, settings.max_parallel)
        self._ray: ModuleType | None = None
        self._task: Any = None
        self._owns_session = False
        self._lock: anyio.Lock | None = None
        self._mailbox: Any = None
        self._tokens = itertools.count()

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
                self._mailbox = ray.remote(_Mailbox).options(max_concurrency=1000).remote()
                self._ray = ray
        return self._ray

    async def run(self, call: StepCall) -> Any:
        ray = await self._connect()
        try:
            payload = ray.cloudpickle.dumps((call.func, call.prev_out))
        except Exception as exc:
            add_note(exc, f"while sending {call.describe()} to Ray: self and prev_out must pickle")
            raise
        token = next(self._tokens)
        ref = self._task.options(**task_options(call, self._resources.get(call.name))).remote(
            payload, self._mailbox, token, carrier()
        )
        del payload
        outcome: list[Any] = []  # taken out of the task group, which would wrap an error

        async def wait_for_result() -> None:
            try:
                outcome.append(await anyio.to_thread.run_sync(ray.get, ref, abandon_on_cancel=True))
            except Exception as exc:
                outcome.append(exc)
                outcome.append(_FAILED)
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve_requests, ray, token, current_step.get())
                await wait_for_result()
            self._mailbox.close.remote(token)
            if outcome[-1] is _FAILED:
                raise outcome[0]
            return outcome[0]
        except anyio.get_cancelled_exc_class():
            self._mailbox.close.remote(token)
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

    async def _serve_requests(self, ray: ModuleType, token: int, sj: StepJournal | None) -> None:
        """Answer the journal requests of call ``token`` while it runs."""
        mailbox = self._mailbox
        while True:
            request = await anyio.to_thread.run_sync(
                ray.get, mailbox.next_request.remote(token), abandon_on_cancel=True
            )
            if request is None:
                return
            request_id, body = request
            if sj is None:
                answer: tuple[bool, Any] = (False, RuntimeError("this step has no journal"))
            else:
                answer = await serve(sj, body)
            mailbox.answer.remote(request_id, answer)

    async def aclose(self) -> None:
        ray, self._ray = self._ray, None
        if ray is not None and self._mailbox is not None:
            ray.kill(self._mailbox)
            self._mailbox = None
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
