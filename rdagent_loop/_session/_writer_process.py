"""The parent's side of the snapshot writer process (the child is ``_disk_worker.py``).

Frames go through a pipe whose end here is non-blocking: the event loop's thread sends
what the pipe takes at once (``send_now``, a single ``writev``), and what it does not take
is left to the writer thread, which waits on the pipe (``send_all``). The two never send
at the same time (``SnapshotWriter`` sees to it), so frames arrive in the order taken.

Every frame is answered in order; ``poll`` reads the answers that are there without
waiting, calls the ``done`` of each file written, and keeps the first failure reported.
The event loop's thread polls with ``wait=False``: it never waits for the lock of the
answers, which the writer thread may hold while it takes them itself.
"""

from __future__ import annotations

import collections
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .._compat import add_note
from .._errors import SnapshotError
from .._pipes import PIPE_SIZE, grow_pipe
from ._atomic import FileOp
from ._disk_worker import END, FRAME, FSYNC, MAKE_DIR, SYNC_DIR, SYNC_PARENT, WRITE

WORKER = Path(__file__).with_name("_disk_worker.py")
_IOV_MAX = 512

Buffers = list[bytes | bytearray | memoryview]


class Frames:
    """Frames to send, and the ``done`` of each (registered when their sending starts)."""

    __slots__ = ("buffers", "dones")

    def __init__(self, buffers: Buffers, dones: list[Callable[[], None] | None]) -> None:
        self.buffers = buffers
        self.dones = dones

    @property
    def nbytes(self) -> int:
        return sum(map(len, self.buffers))


def available() -> bool:
    """Whether the writer process can run here: Linux (it relies on ``PR_SET_PDEATHSIG``),
    and ``sys.executable`` a Python interpreter, not a frozen application or a server that
    embeds Python (which would start itself again)."""
    name = os.path.basename(sys.executable or "")
    return (
        sys.platform.startswith("linux")
        and not getattr(sys, "frozen", False)
        and name.startswith(("python", "pypy"))
    )


def _rebuild(report: dict[str, object]) -> BaseException:
    """The exception the writer process reported, as close to the original as JSON allows."""
    code, path = report.get("errno"), report.get("path")
    exc: BaseException
    if isinstance(code, int):
        strerror = report.get("strerror") or os.strerror(code)
        filename = report.get("filename")
        exc = OSError(code, strerror, filename) if filename is not None else OSError(code, strerror)
    else:
        exc = SnapshotError(f"{report.get('type')}: {report.get('message')}")
    add_note(exc, f"while writing {path} (in the snapshot writer process)")
    return exc


class WriterProcess:
    """One writer process, started at construction; ``close`` waits for it to finish."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-E", "-s", "-B", os.fspath(WORKER), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # Ctrl-C at a terminal is for the run, which drains it
        )
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self._to = self.proc.stdin.fileno()
        self._from = self.proc.stdout.fileno()
        for fd in (self._to, self._from):
            os.set_blocking(fd, False)
        grow_pipe(self._to)
        self._answers: collections.deque[Callable[[], None] | None] = collections.deque()
        # per frame sent, in order: what to call once it is written
        self._partial = b""
        self._lock = threading.Lock()  # one reader of the answers at a time
        self._ended = False
        self.error: BaseException | None = None
        self.closed = False
        self.bytes_written = 0
        self.busy_ns = 0
        self.fsyncs = 0  # reported by the process

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def unanswered(self) -> int:
        return len(self._answers)

    def encode(self, ops: Sequence[FileOp]) -> Frames:
        """The frames for ``ops``, to send in the order they are to be written."""
        buffers: Buffers = []
        for op in ops:
            path = os.fsencode(op.path)
            if op.data is None:
                buffers += (FRAME.pack(SYNC_DIR, 0, len(path), 0), path)
            else:
                flags = (
                    (FSYNC if op.durability == "fsync" else 0)
                    | (SYNC_PARENT if op.sync_dir else 0)
                    | (MAKE_DIR if op.make_dir else 0)
                )
                buffers += (FRAME.pack(WRITE, flags, len(path), len(op.data)), path, op.data)
        return Frames(buffers, [op.done for op in ops])

    def send_now(self, frames: Frames) -> Frames | None:
        """Send what the pipe takes without waiting; return the rest (None: all sent)."""
        if frames.dones:  # answers are expected in the order sending starts
            self._answers.extend(frames.dones)
            frames.dones = []
        buffers = frames.buffers
        try:
            sent = os.writev(self._to, buffers[:_IOV_MAX])
        except BlockingIOError:
            return frames
        except BrokenPipeError:
            raise self._died() from None
        rest = _after(buffers, sent)
        return Frames(rest, []) if rest else None

    def send_all(self, frames: Frames) -> None:
        """Send everything, waiting for room in the pipe (the writer thread does this).

        Answers are taken while it waits: a process blocked on a full answer pipe would
        never make room in the other one.
        """
        rest: Frames | None = frames
        while rest is not None:
            rest = self.send_now(rest)
            if rest is not None:
                readable, _, _ = select.select([self._from], [self._to], [], 1.0)
                if readable:
                    self.poll()

    def poll(self, *, wait: bool = True) -> None:
        """Take the answers that have arrived (from any thread), without waiting for them;
        with ``wait=False``, not even for another thread that is taking them."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._poll()
        finally:
            self._lock.release()

    def _poll(self) -> None:
        while not self.closed:
            try:
                data = os.read(self._from, 65536)
            except BlockingIOError:
                return
            if not data:
                self._ended = True
                if self._answers and self.error is None:
                    self.error = self._died()
                return
            self._take(data)

    def _take(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        answers = self._answers
        for line in lines:
            if line[:1] == b"E":
                if self.error is None:
                    self.error = _rebuild(json.loads(line[2:]))
                continue
            _, written, spent, fsyncs = line.split()
            self.bytes_written += int(written)
            self.busy_ns += int(spent)
            self.fsyncs += int(fsyncs)
            done = answers.popleft()
            if done is not None and self.error is None:
                done()

    def wait_answered(self) -> None:
        """Block until every frame sent has been answered (or the process is gone)."""
        while self._answers and not self._ended:
            self.poll()
            if self._answers and not self._ended:
                select.select([self._from], [], [], 1.0)

    def close(self) -> None:
        """Send ``END`` after everything else, and wait for the process to finish."""
        try:
            self.send_all(Frames([FRAME.pack(END, 0, 0, 0)], []))
        except SnapshotError as exc:
            if self.error is None and self._answers:
                self.error = exc
        try:
            self.wait_answered()
            self.proc.wait()
            self.poll()
        finally:
            self.closed = True
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    stream.close()

    def _died(self) -> SnapshotError:
        code = self.proc.poll()
        if code is None:
            code = self.proc.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return SnapshotError(
            f"the snapshot writer process (pid {self.proc.pid}) {how}; "
            f"{len(self._answers)} snapshot files may not have been written"
        )


def _after(buffers: Sequence[bytes | bytearray | memoryview], sent: int) -> Buffers:
    """What is left of ``buffers`` once their first ``sent`` bytes have gone."""
    for i, buf in enumerate(buffers):
        size = len(buf)
        if sent < size:
            rest: Buffers = [memoryview(buf)[sent:]] if sent else [buf]
            rest += buffers[i + 1 :]
            return rest
        sent -= size
    return []


__all__ = ("PIPE_SIZE", "Frames", "WriterProcess", "available")
