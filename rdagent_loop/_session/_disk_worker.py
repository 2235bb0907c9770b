"""The snapshot writer process: it puts files on disk, in the order it is sent them.

Why a process: a run's event loop is busy between steps, and a writer *thread* only gets the
GIL back, after each of its system calls, when the event loop lets it go; it ends up writing
one file per event-loop pause. A process shares no GIL, so the disk keeps up with the steps.

The parent (``_writer_process.py``) runs this file as a script, with ``python -S``, so that
it starts in milliseconds: it imports only the standard library and ``_atomic`` beside it.

Frames on standard input: ``FRAME`` (op, flags, path length, data length), the path
(file-system encoding), then the data. ``WRITE`` writes the data to the path atomically,
``SYNC_DIR`` fsyncs a folder, ``END`` ends the process. Each ``WRITE`` and ``SYNC_DIR`` is
answered on standard output, in order, by ``A <bytes written> <nanoseconds spent> <fsyncs>``
(the fsyncs it took: the parent counts them, so a test sees that ``durability="fsync"`` reached
the disk here too). A failure is reported once as ``E <json>`` before its answer; later frames
are then answered without being done (a snapshot after a missing one is not written).

The process dies with its parent (a lifeline pipe): a killed run leaves no writer that could
still rename files into a session that is being resumed. What the run had handed over and
was not written yet is dropped; no consumer has seen its results (they are delivered only
once written), and a temporary file it leaves in ``.tmp`` is removed by the next run.
"""

from __future__ import annotations

import os
import struct
import sys
import time

try:
    from . import _atomic
except ImportError:  # run as a script: the folder of this file is on sys.path
    import _atomic  # type: ignore[import-not-found,no-redef]

FRAME = struct.Struct("<BBII")  # op, flags, path length, data length
WRITE, SYNC_DIR, END = 1, 2, 3
FSYNC, SYNC_PARENT, MAKE_DIR, IF_ABSENT = 1, 2, 4, 8  # flags of WRITE

_READ_SIZE = 1 << 20


def _die_with_parent(lifeline: int) -> None:
    """Exit at once when the parent is gone: ``lifeline`` is a pipe whose write end only
    the parent holds, so reading it ends (EOF) when the parent dies, even by SIGKILL. What
    was sent and not written yet is dropped: nothing waits on it any more."""
    import _thread

    def watch() -> None:
        while True:
            try:
                if not os.read(lifeline, 1):
                    break
            except InterruptedError:
                continue
        os._exit(1)

    _thread.start_new_thread(watch, ())


def _error_line(exc: BaseException, path: str) -> bytes:
    import json  # only now: it would add a third to the start-up time

    report = {
        "path": path,
        "type": type(exc).__name__,
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        "strerror": getattr(exc, "strerror", None),
        "filename": getattr(exc, "filename", None),
    }
    return b"E " + json.dumps(report).encode() + b"\n"


class Disk:
    """Carries out frames; remembers the first failure and does nothing after it."""

    def __init__(self) -> None:
        self.failed = False
        self.fsyncs = 0  # of the frame being done

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        self.fsyncs += 1

    def do(
        self, op: int, flags: int, path: str, data: bytes | bytearray, tmp_dir: str | None = None
    ) -> bytes:
        """Do one frame; return its answer (and the report of a failure first)."""
        if self.failed:
            return b"A 0 0 0\n"
        started = time.perf_counter_ns()
        self.fsyncs = 0
        try:
            if op not in (WRITE, SYNC_DIR):
                raise ValueError(f"unknown frame op {op}")
            written = _atomic.FileOp(
                path,
                data if op == WRITE else None,
                "fsync" if flags & FSYNC else "flush",
                sync_dir=bool(flags & SYNC_PARENT),
                make_dir=bool(flags & MAKE_DIR),
                tmp_dir=tmp_dir,
                if_absent=bool(flags & IF_ABSENT),
            ).apply(self.fsync)
        except Exception as exc:
            self.failed = True
            return _error_line(exc, path) + b"A 0 0 %d\n" % self.fsyncs
        return b"A %d %d %d\n" % (written, time.perf_counter_ns() - started, self.fsyncs)


def serve(read_fd: int, write_fd: int) -> None:
    """Do the frames read from ``read_fd`` until ``END`` or end of file."""
    disk = Disk()
    pending = bytearray()
    head = FRAME.size
    while True:
        chunk = os.read(read_fd, _READ_SIZE)
        if not chunk:
            return  # the parent closed the pipe without END: it is gone
        pending += chunk
        answers: list[bytes] = []
        pos = 0
        while len(pending) - pos >= head:
            op, flags, path_len, data_len = FRAME.unpack_from(pending, pos)
            if op == END:
                _answer(write_fd, answers)
                return
            end = pos + head + path_len + data_len
            if len(pending) < end:
                break
            # "<folder for the temporary file>\0<path>", or just the path
            tmp_dir, _, path = os.fsdecode(
                bytes(pending[pos + head : pos + head + path_len])
            ).rpartition("\0")
            answers.append(
                disk.do(op, flags, path, pending[pos + head + path_len : end], tmp_dir or None)
            )
            pos = end
        del pending[:pos]
        _answer(write_fd, answers)


def _answer(fd: int, answers: list[bytes]) -> None:
    data = memoryview(b"".join(answers))
    while data:
        data = data[os.write(fd, data) :]


def main(argv: list[str]) -> None:
    _die_with_parent(int(argv[1]))  # the lifeline's read end
    try:
        serve(sys.stdin.fileno(), sys.stdout.fileno())
    except BrokenPipeError:  # the parent died (SIGKILL): nobody reads the answers
        os._exit(1)


if __name__ == "__main__":
    main(sys.argv)
