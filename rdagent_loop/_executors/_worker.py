"""The main function of a process-pool worker (this code runs in the child).

The worker is started once per pool slot, in its own session and process group, so the
pool can kill it together with everything its steps started. It prepares itself like a
``multiprocessing`` spawn child (same ``sys.path``, working directory and ``__main__``, so
loop classes defined in the main script unpickle), then runs one step per task frame until
its pipe closes. A thread watches a lifeline pipe whose write end only the parent holds: if
the parent dies, even by SIGKILL, the worker kills its own process group instead of
running on as an orphan.

A worker that cannot load the application's code (importing the main script failed, or
started a run of its own: a script without an ``if __name__ == "__main__":`` guard; or the
step's class lives in a ``__main__`` it cannot import) answers every task with a
:class:`MainModuleError` saying so, which the pool turns into a one-line
``WorkerCrashedError``, instead of the nested tracebacks of a run inside the worker.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Any

from .._otel import attached
from .._session._blobs import loads
from . import _wire

MAIN_GUARD = (
    "define loop classes at module level and keep the script's entry point under "
    '`if __name__ == "__main__":`'
)


class MainModuleError(Exception):
    """This worker cannot load the application's code; sent back instead of a result."""


class NestedRunError(RuntimeError):
    """A run asked for worker processes while a worker was importing the main script."""


READY = b"ready"  # the first frame a worker sends, once it has prepared itself

_MAIN_NAMES = ("'__main__'", "'__mp_main__'")  # as unpickling names a missing class's module

# this process is a worker importing the application's main script (process state: one
# worker is one process)
_importing_main = False
_nested_run = False


def refuse_nested_pool() -> None:
    """Called by a process pool as it starts: a pool started while a worker imports the
    main script is a run started by that import (no ``__main__`` guard): stop it there,
    before it starts workers of its own, which would start runs of their own."""
    global _nested_run
    if _importing_main:
        _nested_run = True
        raise NestedRunError(
            f"a worker process imported the main script and it started a run: {MAIN_GUARD}"
        )


def main(argv: list[str] | None = None) -> None:
    to_worker, from_worker, lifeline, shared = (int(a) for a in (argv or sys.argv)[-4:])
    threading.Thread(target=_watch_parent, args=(lifeline,), daemon=True).start()
    region = _wire.SharedRegion(shared) if shared >= 0 else None
    port = _wire.PipePort(to_worker, from_worker)
    prep = _wire.read_frame(to_worker)
    if prep is None:
        return
    failure = _prepare(pickle.loads(prep))
    _wire.write_frame(from_worker, READY)  # the application is imported: steps start now
    while True:
        task = _wire.read_frame(to_worker)
        if task is None:
            return  # the pool closed the pipe
        reply = failure if failure is not None else _run(task, region, port)
        del task
        _flush()
        _wire.write_frame(from_worker, reply)


def _prepare(data: dict[str, Any]) -> bytes | None:
    """Become like a spawn child (imports the main script); the reply to every task if the
    application's code cannot be loaded, else None."""
    # imported here: the pool imports this module too, on the event loop's thread, and
    # multiprocessing's import reads the working directory (a blocking call)
    import multiprocessing.spawn

    global _importing_main
    _importing_main = True
    try:
        multiprocessing.spawn.prepare(data)
    except BaseException as exc:  # the script's own error, SystemExit included
        script = data.get("init_main_from_path") or data.get("init_main_from_name") or "?"
        from .._errors import SessionBusyError

        # a run started by that import stops at the pool, or before, at the session's lock
        what = (
            "started a run"
            if _nested_run or isinstance(exc, SessionBusyError)
            else f"raised {type(exc).__name__}: {' '.join(str(exc).split())}"
        )
        reason = (
            f"the worker imports the main script {script} again, as multiprocessing does, "
            f"and that import {what}; {MAIN_GUARD}"
        )
        return _wire.encode_error(MainModuleError(reason), "")
    finally:
        _importing_main = False
    return None


_blobs: dict[str, bytes] = {}  # large bytes the parent sent once (see _process._pickle_task)


def _run(task: bytearray, region: _wire.SharedRegion | None, port: _wire.PipePort) -> bytes:
    global _blobs
    try:
        new, data, trace_context = _wire.load_task(task, region)
        held = _blobs = {**_blobs, **new}  # a superset of what the parent thinks, if it fails
        used: dict[str, bytes] = {}

        def blob(sha: str, size: int) -> bytes:
            used[sha] = held[sha]
            return held[sha]

        func, prev_out = loads(data, blob)
        _blobs = used  # what the parent now thinks this worker holds
    except Exception as exc:
        if isinstance(exc, AttributeError) and any(m in str(exc) for m in _MAIN_NAMES):
            reason = (
                f"the worker cannot load the step's class from the main module ({exc}); "
                f"{MAIN_GUARD} (a class defined in `python -c`, a notebook or a function "
                "cannot reach a worker)"
            )
            return _wire.encode_error(MainModuleError(reason), "")
        return _wire.encode_error(exc, traceback.format_exc())
    from .. import _journal

    _journal.remote_port = port  # memo_blocking and ask_blocking reach the engine through it
    try:
        with attached(trace_context):  # the step's span is the current span (OpenTelemetry)
            output: Any = func(prev_out)
    except BaseException as exc:  # everything goes back to the parent, which decides
        return _wire.encode_error(exc, traceback.format_exc())
    finally:
        _journal.remote_port = None
    return _wire.encode_output(output)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream is the step's business
            stream.flush()


def _watch_parent(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 1):
                break
        except InterruptedError:
            continue
    os.killpg(0, signal.SIGKILL)
