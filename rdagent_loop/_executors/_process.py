"""The ``process`` executor: a pool of worker processes that lives as long as the run.

Why a pool of our own rather than ``concurrent.futures``: a worker must be killable with
everything it started (``ProcessPoolExecutor`` cannot cancel a running call), a crash must
fail one step rather than break the pool, and waiting must not block the event loop under
asyncio or trio.

* Workers start when a process step first needs one (then the whole pool starts at once,
  so the workers import in parallel), and serve every step of every generation of the run;
  each imports the application once. The pool has ``process_workers`` workers (default
  ``max_parallel``); a killed worker is replaced when a step next needs one.
* A step is shipped as one pickle of ``(bound method, prev_out)``, made on the event loop's
  thread when the step starts: a consistent copy, since no async step runs meanwhile and
  ``thread`` steps are held off as for snapshots. Large tasks travel through shared memory.
  Only the return value comes back; an exception comes back as itself, with the worker's
  traceback as its ``__cause__``.
* **The step works on a copy.** Whatever a process step changes in ``self`` stays in the
  worker and is thrown away; put what must survive in the return value, and let an inline
  step (``record``) apply it to ``self``.
* Each worker leads its own session and process group. Cancelling a step (deadline,
  withdraw, an error elsewhere, the consumer leaving, KeyboardInterrupt) kills the group
  and the worker's other descendants with SIGKILL; the pool starts a fresh worker when one
  is next needed. Processes the application started itself are not touched.
* A worker that dies under a step (killed, segfault, out of memory) fails only that step,
  with :class:`WorkerCrashedError` naming the step and the signal.
* POSIX only (process groups, ``pidfd`` on Linux, a polling fallback elsewhere).
* Like ``multiprocessing``'s spawn start method, workers import the main script as
  ``__mp_main__``, so a script that starts a run needs an ``if __name__ == "__main__":``
  guard. Without one, the import in the worker starts a run there: its pool refuses to
  start (:func:`._worker.refuse_nested_pool`), and the step fails with a one-line
  :class:`WorkerCrashedError` that names the guard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from typing import Any

import anyio
import psutil

from .._compat import add_note
from .._errors import WorkerCrashedError
from .._journal import StepJournal, current_step, serve
from .._otel import carrier
from .._pipes import grow_pipe
from .._session._blobs import Blobs, dumps
from .._session._capture import without_tearing
from . import _wire, _worker
from ._base import StepCall

log = logging.getLogger("rdagent_loop")

_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from rdagent_loop._executors._worker import main; main()"
)
_REAP_TIMEOUT = 10.0


class _WorkerDied(Exception):
    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode


class _Worker:
    """The parent's handle on one worker: its process, pipes, and exit notification."""

    def __init__(self, prep: bytes, lifeline: int) -> None:
        to_r, self.to_fd = os.pipe()
        self.from_fd, from_w = os.pipe()
        self.region = _shared_region()
        shared = self.region.fd if self.region is not None else -1
        passed = (to_r, from_w, lifeline) + ((shared,) if shared >= 0 else ())
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT,
                    json.dumps(_sys_path()),
                    *(str(fd) for fd in (to_r, from_w, lifeline, shared)),
                ],
                stdin=subprocess.DEVNULL,
                pass_fds=passed,
                start_new_session=True,
            )
        except BaseException:
            for fd in (self.to_fd, self.from_fd):
                os.close(fd)
            if self.region is not None:
                self.region.close()
            raise
        finally:
            os.close(to_r)
            os.close(from_w)
        self.pid = self.proc.pid
        for fd in (self.to_fd, self.from_fd):
            os.set_blocking(fd, False)
            grow_pipe(fd)
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(self.pid)
        self._outbox: list[bytes | memoryview] = [_wire.HEADER.pack(len(prep)), prep]
        self._reader = _wire.FrameReader()
        self.ready = False  # it has imported the application (its first frame says so)
        self.blobs: set[str] = set()  # the blobs it holds (see ProcessExecutor._pickle_task)
        self.closed = False
        # now, so the worker imports the main module while no step waits for it; a worker
        # that died already is found out by the first request
        with contextlib.suppress(OSError):
            self._send_nowait()

    def stage_answer(self, answer: bytes) -> None:
        """Queue the answer to a request the step sent (see ``_wire.PipePort``)."""
        self._outbox += [_wire.HEADER.pack(len(answer)), answer]

    def stage(self, task: _wire.Chunks) -> None:
        """Queue one task: copy it into shared memory now, or into the frame."""
        if self.region is not None and task.size >= _wire.SHARED_MIN:
            self.region.store(task)
            body = _wire.SHARED + _wire.SHARED_TASK.pack(task.size, self.region.size)
            self._outbox += [_wire.HEADER.pack(len(body)), body]
        else:
            self._outbox += [_wire.HEADER.pack(1 + task.size), _wire.IN_FRAME, *task.parts]

    async def wait_ready(self) -> None:
        """Wait until the worker has imported the application (at once after the first
        time); raise ``_WorkerDied`` if it dies first."""
        if not self.ready:
            await self.request()  # sends what is left of the preparation data, if anything
            self.ready = True

    async def request(self) -> bytearray:
        """Send the staged task, wait for its reply; raise ``_WorkerDied`` if the worker dies."""
        reply: bytearray | None = None

        async def exchange() -> None:
            nonlocal reply
            try:
                await self._send()
                reply = await self._receive()
            except OSError:  # EPIPE: the worker is gone; its exit status says why
                reply = None
            tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(exchange)
            await self._wait_exit()
            tg.cancel_scope.cancel()
        if reply is None:
            # everything a dead worker wrote is readable now
            with contextlib.suppress(OSError):
                self._reader.pump(self.from_fd)
            if self._reader.frames:
                return self._reader.frames.pop(0)
            with anyio.move_on_after(1):
                await self._wait_exit()
            raise _WorkerDied(self.proc.poll())
        return reply

    async def _send(self) -> None:
        while self._outbox:
            self._send_nowait()
            if self._outbox:
                await anyio.wait_writable(self.to_fd)

    def _send_nowait(self) -> None:
        """Write what the pipe takes now; leave the rest in the outbox."""
        while self._outbox:
            chunk = self._outbox[0]
            try:
                written = os.write(self.to_fd, chunk)
            except BlockingIOError:
                return
            if written < len(chunk):
                self._outbox[0] = memoryview(chunk)[written:]
                return
            self._outbox.pop(0)

    async def _receive(self) -> bytearray | None:
        while not self._reader.frames:
            await anyio.wait_readable(self.from_fd)
            if not self._reader.pump(self.from_fd):
                return self._reader.frames.pop(0) if self._reader.frames else None
        return self._reader.frames.pop(0)

    async def _wait_exit(self) -> None:
        if self.pidfd is not None:
            await anyio.wait_readable(self.pidfd)
        else:
            # no pidfd (not Linux): nothing to wait on but the exit status itself
            while self.proc.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(0.02)

    def kill(self) -> None:
        """Kill the worker's process group and its other descendants; close our ends."""
        if self.closed:
            return
        self.closed = True
        # list the descendants first: once the worker is dead they are orphans, unfindable
        descendants = _descendants(self.pid) if self.proc.poll() is None else []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in descendants:  # those that left the group (start_new_session=True)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for fd in (self.to_fd, self.from_fd, self.pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.region is not None:
            self.region.close()

    def reaped(self) -> bool:
        return self.proc.poll() is not None


class ProcessExecutor:
    """A pool of ``size`` reusable worker processes; see the module docstring."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._slots: anyio.CapacityLimiter | None = None
        self._idle: list[_Worker] = []
        self._busy = 0
        self._dying: list[_Worker] = []
        self._prep: bytes | None = None
        self._lifeline: tuple[int, int] | None = None
        self._blobs = Blobs()

    async def run(self, call: StepCall) -> Any:
        if self._slots is None:
            self._slots = anyio.CapacityLimiter(self._size)
        sj = current_step.get()
        if sj is not None:  # while the step waits for an answer, its worker is lent out
            sj.lenders.append(_LentWorker(self._slots))
        async with self._slots:
            call.timing.restart()  # waiting for a free worker is not the step's time
            self._reap()
            if not self._idle:
                self._fill()
            worker = self._idle.pop()
            try:
                task = self._pickle_task(call, worker)
            except Exception as exc:
                self._idle.append(worker)
                add_note(
                    exc,
                    f"while sending {call.describe()} to a worker process: the loop object "
                    "and prev_out must be picklable",
                )
                raise
            self._busy += 1
            healthy = False
            try:
                if not worker.ready:
                    await worker.wait_ready()
                    call.timing.restart()  # nor is the worker's start
                worker.stage(task)
                del task
                reply = await worker.request()
                while reply[:1] == _wire.REQUEST:  # the step calls the journal
                    worker.stage_answer(await _serve(sj, reply))
                    reply = await worker.request()
                healthy = True
            except _WorkerDied as died:
                rc = died.returncode
                signum = -rc if rc is not None and rc < 0 else None
                exitcode = rc if rc is not None and rc >= 0 else None
                raise WorkerCrashedError(
                    call.name, call.loop_idx, worker.pid, signum, exitcode
                ) from None
            finally:
                self._busy -= 1
                if not healthy:
                    self._discard(worker)
                elif self._busy + len(self._idle) >= self._slots.total_tokens:
                    self._discard(worker)  # one started while a step waited for an answer
                else:
                    self._idle.append(worker)
        try:
            return _wire.decode_reply(reply)
        except _worker.MainModuleError as exc:
            raise WorkerCrashedError(
                call.name, call.loop_idx, worker.pid, None, None, reason=str(exc)
            ) from None

    def _pickle_task(self, call: StepCall, worker: _Worker) -> _wire.Chunks:
        """Pickle ``(bound method, prev_out)`` with large ``bytes`` by reference (as
        snapshots store them), plus the blobs ``worker`` does not hold yet: an unchanged
        10 MB attribute crosses to each worker once, not at every step. If a ``thread`` step
        changing ``self`` meanwhile tore the copy ("dictionary changed size during
        iteration"), pickle it again with other threads held off, as snapshots are."""
        data, found = without_tearing(lambda: dumps((call.func, call.prev_out), self._blobs))
        self._blobs.forget_unseen()
        new = {sha: blob for sha, blob in found.items() if sha not in worker.blobs}
        worker.blobs = set(found)  # the worker keeps what this task uses, and nothing else
        # and the step span's trace context (OpenTelemetry), for the step's own spans
        return _wire.pickle_chunks((new, data, carrier()))

    def prestart(self) -> None:
        """Start the workers now (the run is starting), so they import while the first,
        inline steps run instead of when the first process step needs them."""
        _worker.refuse_nested_pool()
        if self._busy == 0 and not self._idle:
            self._fill()

    def _fill(self) -> None:
        """Start every missing worker at once, so they import in parallel, not one by one
        as the steps of a ramping-up run come to need them."""
        size = self._size if self._slots is None else int(self._slots.total_tokens)
        for _ in range(size - self._busy - len(self._idle)):
            self._idle.append(self._spawn())

    def _spawn(self) -> _Worker:
        _worker.refuse_nested_pool()
        if self._prep is None:
            self._prep = pickle.dumps(_preparation_data(), protocol=_wire.PROTOCOL)
        if self._lifeline is None:
            self._lifeline = os.pipe()
        worker = _Worker(self._prep, self._lifeline[0])
        log.debug("process pool: started worker %d", worker.pid)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._dying.append(worker)
        log.debug("process pool: killed worker %d", worker.pid)

    def _reap(self) -> None:
        self._dying = [w for w in self._dying if not w.reaped()]

    async def aclose(self) -> None:
        """Kill every worker and wait (briefly, shielded) until each one is reaped."""
        while self._idle:
            self._discard(self._idle.pop())
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None
        with anyio.CancelScope(shield=True), anyio.move_on_after(_REAP_TIMEOUT):
            self._reap()
            while self._dying:
                await anyio.sleep(0.005)
                self._reap()
        for worker in self._dying:
            log.warning("process pool: worker %d did not exit after SIGKILL", worker.pid)


async def _serve(sj: StepJournal | None, request: bytearray) -> bytes:
    """Carry out a journal request of the step in a worker; the pickled answer."""
    if sj is None:
        answer: tuple[bool, Any] = (False, RuntimeError("this step has no journal"))
    else:
        answer = await serve(sj, pickle.loads(memoryview(request)[1:]))
    try:
        return pickle.dumps(answer, protocol=_wire.PROTOCOL)
    except Exception:  # an exception that does not pickle
        return pickle.dumps((False, RuntimeError(repr(answer[1]))), protocol=_wire.PROTOCOL)


class _LentWorker:
    """A process step waiting for an answer: one more worker may start meanwhile."""

    def __init__(self, slots: anyio.CapacityLimiter) -> None:
        self.slots = slots

    def lend(self) -> None:
        self.slots.total_tokens += 1

    def take_back(self) -> None:
        self.slots.total_tokens -= 1


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, from ``/proc`` where it lists children (Linux: fast,
    no scan of every process), else from psutil."""
    if not _PROC_CHILDREN:
        with contextlib.suppress(psutil.Error):
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        return []
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        with contextlib.suppress(OSError):  # it exited meanwhile
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                stack += children
    return found


_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children")


def _shared_region() -> _wire.SharedRegion | None:
    """Shared memory for large tasks, where the platform has ``memfd_create`` (Linux)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        return _wire.SharedRegion(os.memfd_create("rdagent_loop-task", os.MFD_CLOEXEC))
    except OSError:
        return None


def _sys_path() -> list[str]:
    return [p if p else os.getcwd() for p in sys.path if isinstance(p, str)]


def _preparation_data() -> dict[str, Any]:
    """What ``multiprocessing.spawn.prepare`` needs in the worker, like a spawn child.

    Built here rather than by ``get_preparation_data``, which fixes the application's
    default start method as a side effect.
    """
    import multiprocessing.process

    data: dict[str, Any] = {
        "name": "rdagent_loop-worker",
        "sys_path": _sys_path(),
        "sys_argv": list(sys.argv),
        "dir": os.getcwd(),
        "orig_dir": getattr(multiprocessing.process, "ORIGINAL_DIR", None),
    }
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    main_path = getattr(main, "__file__", None)
    if spec_name is not None:
        data["init_main_from_name"] = spec_name
    elif main_path is not None:
        data["init_main_from_path"] = os.path.abspath(main_path)
    return data
