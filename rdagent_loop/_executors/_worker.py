"""The main function of a process-pool worker (this code runs in the child).

The worker is started once per pool slot, in its own session and process group, so the
pool can kill it together with everything its steps started. It prepares itself like a
``multiprocessing`` spawn child (same ``sys.path``, working directory and ``__main__``, so
loop classes defined in the main script unpickle), then runs one step per task frame until
its pipe closes. A thread watches a lifeline pipe whose write end only the parent holds: if
the parent dies, even by SIGKILL, the worker kills its own process group instead of
running on as an orphan.
"""

from __future__ import annotations

import contextlib
import multiprocessing.spawn
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Any

from . import _wire


def main(argv: list[str] | None = None) -> None:
    to_worker, from_worker, lifeline, shared = (int(a) for a in (argv or sys.argv)[-4:])
    threading.Thread(target=_watch_parent, args=(lifeline,), daemon=True).start()
    region = _wire.SharedRegion(shared) if shared >= 0 else None
    prep = _wire.read_frame(to_worker)
    if prep is None:
        return
    multiprocessing.spawn.prepare(pickle.loads(prep))
    while True:
        task = _wire.read_frame(to_worker)
        if task is None:
            return  # the pool closed the pipe
        reply = _run(task, region)
        del task
        _flush()
        _wire.write_frame(from_worker, reply)


def _run(task: bytearray, region: _wire.SharedRegion | None) -> bytes:
    try:
        func, prev_out = _wire.load_task(task, region)
        output: Any = func(prev_out)
    except BaseException as exc:  # everything goes back to the parent, which decides
        return _wire.encode_error(exc, traceback.format_exc())
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
