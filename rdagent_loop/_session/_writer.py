"""The run's snapshot writer: files reach the disk in order, off the event loop's thread.

One path: ``dump()`` captures a job and ``submit`` queues it (it never waits); the writer's
*sender* task builds each job's files (in a worker thread when large segments must be cut
and hashed first) and hands them to the disk; once a job's step file is on disk, the
callbacks given to ``then`` run, on the event loop's thread. The run delivers each result
that way: a consumer only ever sees a step whose snapshot is on disk.

The disk is a writer *process* (``_disk_worker.py``) fed through a pipe, where one can be
started; else a worker thread. Why a process: a run's event loop is busy between steps,
and a thread gets the GIL back after each of its system calls only when the event loop
lets it go. With 2,000 tiny steps per second the process keeps up, a thread does not
(``benchmarks``: "the same, snapshot_writer="thread"" row).

* ``await wait_room()`` after ``submit`` keeps memory bounded: while more than
  ``max_pending`` bytes are not on disk, it waits.
* ``await drain()`` waits until every snapshot submitted so far is on disk (before a
  withdraw reads the one to restore), and raises a failed write's error.

Leaving the context manager waits until everything handed over is on disk (shielded from
cancellation, so a run never returns with a snapshot in flight). A failed write is raised
by the next ``submit``, by ``drain``, or when the run ends; what was queued after it is not
written.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import anyio
from anyio.abc import Process, TaskGroup

from .._compat import add_note
from .._errors import SnapshotError
from ._atomic import FileOp
from ._capture import SnapshotJob
from ._disk_worker import (
    END,
    FRAME,
    FSYNC,
    IF_ABSENT,
    MAKE_DIR,
    SYNC_DIR,
    SYNC_PARENT,
    WRITE,
)

if TYPE_CHECKING:
    from ._atomic import Fsync

log = logging.getLogger("rdagent_loop")

WriterMode = Literal["auto", "process", "thread"]
WORKER = Path(__file__).with_name("_disk_worker.py")
SEND_SLICE = 1 << 20  # a pipe write never copies more than this into a transport buffer


def process_available() -> bool:
    """Whether a writer process can start here: ``sys.executable`` is a Python interpreter,
    not a frozen application or a server that embeds Python (which would start itself)."""
    name = os.path.basename(sys.executable or "")
    return not getattr(sys, "frozen", False) and name.startswith(("python", "pypy"))


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """What a snapshot writer has done so far."""

    jobs_done: int
    jobs_pending: int
    bytes_pending: int
    bytes_written: int
    fsyncs: int  # taken by the writer thread or process (not by jobs written inline)
    process_id: int | None  # of the writer process, if there is one


class SnapshotWriter:
    """Writes the snapshots of one ``run()`` in order, off the event loop's thread.

    ``fsync`` is what the writer thread calls to make a file or folder durable (a test
    passes one that counts); the writer process calls ``os.fsync`` and reports how many it
    took (``statistics().fsyncs``).
    """

    def __init__(
        self,
        *,
        mode: WriterMode = "auto",
        max_pending: int = 256 * 1024 * 1024,
        fsync: Fsync = os.fsync,
    ) -> None:
        if mode not in ("auto", "process", "thread"):
            raise ValueError(f"mode must be 'auto', 'process' or 'thread', got {mode!r}")
        self.mode = mode
        self.max_pending = max_pending
        self._fsync = fsync
        self._queue: collections.deque[tuple[SnapshotJob, int]] = collections.deque()
        self._callbacks: dict[int, list[Callable[[], None]]] = {}
        self._answers: collections.deque[Callable[[], None] | None] = collections.deque()
        self._changed = anyio.Event()  # set when a job comes in or finishes
        self._task_group: TaskGroup | None = None
        self._process: Process | None = None
        self._lifeline = -1
        self._open = False
        self._closing = False
        self._error: BaseException | None = None
        self._delivered = False
        self._submitted = self._done = 0  # jobs
        self._submitted_bytes = self._done_bytes = 0
        self._sizes: collections.deque[int] = collections.deque()
        self._bytes = self._fsyncs = 0
        self._jobs_in_pipe: collections.deque[SnapshotJob] = collections.deque()
        self.on_failure: Callable[[BaseException], None] | None = None
        """Called (on the event loop's thread) when a write fails."""

    # -- the caller's side ----------------------------------------------------------------

    async def __aenter__(self) -> SnapshotWriter:
        if self.mode == "process" or (self.mode == "auto" and process_available()):
            await self._start_process()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._send)
        if self._process is not None:
            self._task_group.start_soon(self._take_answers)
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        self._closing = True
        self._signal()
        task_group, self._task_group = self._task_group, None
        if task_group is not None:
            task_group.cancel_scope.shield = True  # the run's cancellation must not drop a job
            await task_group.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                await self._stop_process()
        error = self.take_error()
        if error is not None:
            if exc is None:
                raise error
            add_note(exc, f"a snapshot could not be written either: {error!r}")

    def submit(self, job: SnapshotJob) -> bool:
        """Queue ``job``; False if the writer is not running (the caller writes it itself).

        It never waits: call ``await wait_room()`` after it to keep memory bounded. After a
        failed write, the error is raised once (here, by ``drain`` or at exit, unless
        ``on_failure`` took it), and later jobs are dropped.
        """
        error = self.take_error()
        if error is not None:
            raise error
        if self._error is not None:  # the run is failing: nothing more is written
            job.failed()
            return True
        if not self._open:
            return False
        size = job.nbytes
        self._submitted += 1
        self._submitted_bytes += size
        self._queue.append((job, size))
        self._signal()
        return True

    def then(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything submitted so far is on disk (now if it is).

        Never called if a write fails first.
        """
        if self._error is not None:
            return
        if self._done == self._submitted:
            callback()
        else:
            self._callbacks.setdefault(self._submitted, []).append(callback)

    async def wait_room(self) -> None:
        """Wait while more than ``max_pending`` bytes are not on disk yet (at once, without
        a checkpoint, when there is room: the engine calls it at every step)."""
        while self._submitted_bytes - self._done_bytes > self.max_pending and self._error is None:
            await self._changed.wait()

    @property
    def submitted(self) -> int:
        """How many jobs were submitted so far: a mark for ``is_written``/``wait_written``."""
        return self._submitted

    def is_written(self, mark: int) -> bool:
        """Whether the first ``mark`` jobs are on disk (or the writer failed)."""
        return self._done >= mark or self._error is not None

    async def wait_written(self, mark: int) -> None:
        """Wait until the first ``mark`` jobs are on disk; raise a failed write's error."""
        while not self.is_written(mark):
            await self._changed.wait()
        error = self.take_error()
        if error is not None:
            raise error

    async def drain(self) -> None:
        """Wait until every snapshot submitted so far is on disk; raise a failed write's error.

        Cancelling it cancels only the wait, not the writing.
        """
        await self.wait_written(self._submitted)

    def statistics(self) -> WriterStatistics:
        process = self._process
        return WriterStatistics(
            jobs_done=self._done,
            jobs_pending=self._submitted - self._done,
            bytes_pending=self._submitted_bytes - self._done_bytes,
            bytes_written=self._bytes,
            fsyncs=self._fsyncs,
            process_id=None if process is None else process.pid,
        )

    # -- the writer's side ----------------------------------------------------------------

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def _job_done(self) -> None:
        """The step file of the oldest job in flight is on disk."""
        self._done += 1
        self._done_bytes += self._sizes.popleft()
        if self._jobs_in_pipe:
            self._jobs_in_pipe.popleft()
        for callback in self._callbacks.pop(self._done, ()):
            callback()
        self._signal()

    def _fail(self, error: BaseException) -> None:
        first = self._error is None
        if first:
            self._error = error
        for job, _ in self._queue:
            job.failed()
        for job in self._jobs_in_pipe:
            job.failed()
        self._queue.clear()
        self._callbacks.clear()
        self._signal()
        if first and self.on_failure is not None:
            # its results will never be delivered: whoever waits for them must hear now
            self.on_failure(error)

    def take_error(self) -> BaseException | None:
        """The error of a failed write, the first time it is asked for (then None)."""
        error = self._error
        if error is None or self._delivered:
            return None
        self._delivered = True
        return error

    async def _send(self) -> None:
        """Build each job's files, in order, and hand them to the disk."""
        with anyio.CancelScope(shield=True):  # the run's cancellation must not drop a job
            while True:
                if not self._queue:
                    if self._closing:
                        await self._send_end()
                        return
                    await self._changed.wait()
                    continue
                job, size = self._queue.popleft()
                self._sizes.append(size)
                try:
                    if job.chunked:  # cutting and hashing large segments: a worker thread
                        ops = await anyio.to_thread.run_sync(job.operations, _step_file)
                    else:
                        ops = job.operations(_step_file)
                    if self._process is None:
                        await self._write_in_thread(ops)
                    else:
                        self._jobs_in_pipe.append(job)
                        await self._send_frames(ops)
                except Exception as exc:
                    job.failed()
                    add_note(exc, f"while writing the snapshot {job.path}")
                    self._fail(exc)

    async def _send_end(self) -> None:
        """Tell the process that nothing more comes: it answers, then exits."""
        process = self._process
        if process is not None and process.returncode is None and process.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, BrokenPipeError, ConnectionError):
                await process.stdin.send(FRAME.pack(END, 0, 0, 0))

    async def _write_in_thread(self, ops: list[FileOp]) -> None:
        def write() -> None:
            for op in ops:
                self._bytes += op.apply(self._count_fsync)

        await anyio.to_thread.run_sync(write)
        self._job_done()

    def _count_fsync(self, fd: int) -> None:
        self._fsync(fd)
        self._fsyncs += 1

    # -- the writer process ---------------------------------------------------------------

    async def _start_process(self) -> None:
        read_end, write_end = os.pipe()  # the lifeline: see _disk_worker._die_with_parent
        try:
            self._process = await anyio.open_process(
                [sys.executable, "-S", "-E", "-s", "-B", os.fspath(WORKER), str(read_end)],
                pass_fds=(read_end,),
                start_new_session=True,  # Ctrl-C at a terminal is for the run, which drains it
                stderr=None,
            )
        except OSError as exc:
            os.close(write_end)
            if self.mode == "process":
                raise
            log.info("no snapshot writer process (%r): writing on a thread", exc)
        else:
            self._lifeline = write_end
        finally:
            os.close(read_end)

    async def _send_frames(self, ops: list[FileOp]) -> None:
        process = self._process
        assert process is not None
        buffers: list[bytes | bytearray | memoryview] = []
        for op in ops:
            path = os.fsencode(op.path if op.tmp_dir is None else f"{op.tmp_dir}\0{op.path}")
            self._answers.append(self._job_done if op.done is not None else None)
            if op.data is None:
                buffers += (FRAME.pack(SYNC_DIR, 0, len(path), 0), path)
                continue
            flags = (
                (FSYNC if op.durability == "fsync" else 0)
                | (SYNC_PARENT if op.sync_dir else 0)
                | (MAKE_DIR if op.make_dir else 0)
                | (IF_ABSENT if op.if_absent else 0)
            )
            parts = op.data if isinstance(op.data, list) else [op.data]
            size = sum(map(len, parts))
            buffers += (FRAME.pack(WRITE, flags, len(path), size), path, *parts)
        small = [b for b in buffers if len(b) < SEND_SLICE]
        if len(small) == len(buffers):
            await self._write_pipe(process, b"".join(buffers))
            return
        for buffer in buffers:  # large data in slices: no whole copy in a transport buffer
            view = memoryview(buffer).cast("B")
            for start in range(0, len(view), SEND_SLICE):
                await self._write_pipe(process, view[start : start + SEND_SLICE])

    async def _write_pipe(self, process: Process, data: bytes | memoryview) -> None:
        assert process.stdin is not None
        try:
            # a bytes-like object: asyncio's and trio's pipe streams take views as they are
            await process.stdin.send(data)  # type: ignore[arg-type]
        except (anyio.BrokenResourceError, BrokenPipeError, ConnectionError):
            raise await self._died() from None

    async def _take_answers(self) -> None:
        """Read the process's answers: one line per frame, in order."""
        process = self._process
        assert process is not None
        assert process.stdout is not None
        partial = b""
        with anyio.CancelScope(shield=True):
            while True:
                try:
                    data = await process.stdout.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    if self._answers and self._error is None:
                        self._fail(await self._died())
                    return
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    self._take(line)

    def _take(self, line: bytes) -> None:
        if line[:1] == b"E":
            self._fail(_rebuild(json.loads(line[2:])))
            return
        _, written, _spent, fsyncs = line.split()
        self._bytes += int(written)
        self._fsyncs += int(fsyncs)
        done = self._answers.popleft()
        if done is not None and self._error is None:
            done()

    async def _stop_process(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            await process.wait()
        finally:
            await process.aclose()
            if self._lifeline >= 0:
                os.close(self._lifeline)
                self._lifeline = -1

    async def _died(self) -> SnapshotError:
        process = self._process
        assert process is not None
        code = await process.wait()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return SnapshotError(
            f"the snapshot writer process (pid {process.pid}) {how}; "
            f"{len(self._answers)} snapshot files may not have been written"
        )


def _step_file() -> None:
    """Marks a job's step file among its files (``FileOp.done``): when it is on disk, the
    job is (its answer from the process, or the end of the thread's writes, says so)."""


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
