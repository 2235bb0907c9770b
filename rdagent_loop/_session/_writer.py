"""The run's snapshot writer: disk work off the event loop's thread, in order, drained at exit.

``dump()`` captures the state synchronously and hands the job over. Where it can (Linux),
the writer builds the files' bytes right there and sends them to a writer *process*
(``_writer_process.py``), which writes them in parallel: a thread of this process would
have to win the GIL back from a busy event loop after every system call. Jobs that need
slow work first (cutting and hashing large segments into chunks), and whatever the pipe
to the process cannot take at once, go to the writer thread, which sends them on in
order; elsewhere (or with ``snapshot_writer="thread"``) the thread writes the files itself.

Nothing here blocks the event loop's thread: ``submit`` builds bytes and queues them, or
sends what the pipe takes at once. Waiting is async, and the caller's to do:

* ``await wait_room()`` after ``submit`` keeps memory bounded: while the writer thread is
  more than ``max_pending`` bytes behind, it waits. With room (nearly always) it returns at
  once, without a checkpoint, so the engine can call it at every step.
* ``await drain()`` waits until every snapshot submitted so far is on disk (before a
  withdraw reads the one to restore), and raises a failed write's error.

A waiting task is woken by the writer thread through the event loop's token
(``anyio.from_thread.run_sync``, on asyncio and trio alike), once per wait: the thread looks
at the waiters only after it has counted what it finished, and a waiter publishes its event
before it looks at the counts again, so no wake-up is lost.

The thread starts with the first job; it starts the process (starting one waits for it to
exist) and ends it. The run waits for both when it ends (shielded from cancellation, so a
run never returns with a snapshot still in flight). A failed write is raised by the next
``submit`` (the run then fails on the step that tried to save), by ``drain``, or when the
run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.lowlevel

from .._compat import add_note
from ._atomic import FileOp
from ._capture import SnapshotJob
from ._writer_process import Frames, WriterProcess, available

if TYPE_CHECKING:
    from ._atomic import Fsync

log = logging.getLogger("rdagent_loop")

WriterMode = Literal["auto", "process", "thread"]
POLL_JOBS = 16
POLL_SECONDS = 0.05


class _Barrier:
    """Queued by ``drain``: the thread sets ``reached`` once everything before it is on disk."""

    __slots__ = ("reached",)

    def __init__(self) -> None:
        self.reached = anyio.Event()


_Item = SnapshotJob | Frames | _Barrier  # a job to build and send, frames to send, or a barrier


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """What a snapshot writer has done so far."""

    jobs_done: int
    jobs_pending: int
    bytes_pending: int
    bytes_written: int
    fsyncs: int  # taken by the writer thread or process (not by jobs the caller wrote itself)
    process_id: int | None  # of the writer process, if there is one


class SnapshotWriter:
    """Writes the snapshots of one ``run()`` off the event loop's thread.

    An async context manager: leaving it waits until everything handed over is on disk.
    ``fsync`` is what the writer thread calls to make a file or folder durable (a test passes
    one that counts); the writer process, a program of its own, calls ``os.fsync`` and
    reports how many it took (``statistics().fsyncs``).
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
        self._queue: queue.SimpleQueue[tuple[_Item, int] | None] = queue.SimpleQueue()
        self._token: anyio.lowlevel.EventLoopToken | None = None  # to wake a waiting task
        self._room: anyio.Event | None = None  # a wait_room() is (or was) waiting on it
        self._thread: threading.Thread | None = None
        self._process: WriterProcess | None = None
        self._open = False
        self._error_lock = threading.Lock()
        self._error: BaseException | None = None
        self._delivered = False
        # Counters without a shared lock: each is written by one thread only (submitted by
        # the submitter, finished by the writer thread, done by whoever learns a job's
        # snapshot is on disk), because a lock shared with a thread that loses the GIL at
        # every system call would make the event loop wait for it.
        self._jobs = 0
        self._submitted = self._submitted_bytes = 0
        self._finished = self._finished_bytes = 0
        self._done = self._bytes = self._fsyncs = 0
        self._next_poll_job = 0
        self._next_poll_time = 0.0

    async def __aenter__(self) -> SnapshotWriter:
        self._token = anyio.lowlevel.current_token()
        self._open = True
        if self.mode == "process" or (self.mode == "auto" and available()):
            # the thread starts the process before anything is written, and the event loop
            # sends every snapshot straight to it: jobs handed to the thread while it started
            # kept later ones queued behind them, and a thread gets the GIL back from a busy
            # event loop too seldom to catch up (snapshots/s fell by ~15%)
            barrier = _Barrier()
            self._hand_to_thread(barrier, 0)
            await barrier.reached.wait()
            error = self._take_error()
            if error is not None:
                raise error
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        thread, self._thread = self._thread, None
        if thread is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._finish, thread)
        error = self._take_error()
        if error is not None:
            if exc is None:
                raise error
            log.error("a snapshot could not be written: %r", error)

    def _finish(self, thread: threading.Thread) -> None:
        """Let the thread, then the process it started, write everything they were given."""
        self._queue.put(None)
        thread.join()

    def submit(self, job: SnapshotJob) -> bool:
        """Hand ``job`` over; False if the writer is not running (the caller writes it itself).

        It never waits: call ``await wait_room()`` after it to keep memory bounded. After a
        failed write, the error is raised once (here, by ``drain`` or at exit); later jobs are
        left to the caller.
        """
        error = self._take_error(poll=self._poll_due())
        if error is not None:
            raise error
        if not self._open or self._error is not None:
            if self._error is not None and job.index is not None:
                job.index.forget()  # it counts chunks of jobs that were dropped as stored
            return False
        size = job.nbytes
        self._jobs += 1
        process = self._process
        if process is None or job.chunked:
            # no process (or not yet: the thread starts it, with the first job), or a job
            # slow to build: the thread does it
            self._hand_to_thread(job, size)
            return True
        # built here even while the thread is busy (it then only sends): a thread gets the
        # GIL back from the event loop too seldom to build jobs as fast as they come
        frames = process.encode(self._operations(job))
        if self._submitted != self._finished:  # behind what the thread holds
            self._hand_to_thread(frames, frames.nbytes)
            return True
        rest = process.send_now(frames)  # nothing ahead of it: straight into the pipe
        if rest is not None:
            self._hand_to_thread(rest, rest.nbytes)
        return True

    def _start_process(self) -> None:
        """Start the writer process if there is to be one (the thread does, as it starts:
        starting a process waits for it to exist, which the event loop must not)."""
        if self.mode == "thread" or (self.mode == "auto" and not available()):
            return
        try:
            self._process = WriterProcess()
        except OSError as exc:
            if self.mode == "process":
                raise
            log.info("no snapshot writer process (%r): writing on a thread", exc)

    def _hand_to_thread(self, item: _Item, size: int) -> None:
        self._submitted += 1
        self._submitted_bytes += size
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="rdagent-loop-snapshots", daemon=True
            )
            self._thread.start()
        self._queue.put((item, size))

    def _operations(self, job: SnapshotJob) -> list[FileOp]:
        """The job's files. The ``done`` of the last file holds no reference to the job,
        which can go as soon as its bytes are sent."""
        return job.operations(self._job_done)

    def _job_done(self) -> None:
        self._done += 1

    async def wait_room(self) -> None:
        """Wait while the writer thread is more than ``max_pending`` bytes behind.

        For the event loop's thread, after ``submit``. With room it returns at once, without
        a checkpoint (it costs two reads at every step); else the thread wakes it once it has
        caught up enough, and the event loop runs on meanwhile. A single job larger than
        ``max_pending`` is waited for until it is written.
        """
        while self._submitted_bytes - self._finished_bytes > self.max_pending:
            room = self._room
            if room is None:
                # published before the counts are read again: the thread, which counts
                # before it looks for a waiter, either sees it or has made room already
                self._room = anyio.Event()
                continue
            await room.wait()

    async def drain(self) -> None:
        """Wait until every snapshot submitted so far is on disk; raise a failed write's error.

        For the event loop's thread. With nothing in flight it returns at once (no
        checkpoint); snapshots submitted while it waits are not waited for. Cancelling it
        cancels only the wait, not the writing.
        """
        if self._open and self._in_flight():
            barrier = _Barrier()
            self._hand_to_thread(barrier, 0)  # behind everything already handed over
            await barrier.reached.wait()
        error = self._take_error()
        if error is not None:
            raise error

    def _in_flight(self) -> bool:
        if self._submitted != self._finished:
            return True
        process = self._process
        if process is None:
            return False
        process.poll(wait=False)
        return process.unanswered > 0

    def statistics(self) -> WriterStatistics:
        process = self._process
        return WriterStatistics(
            jobs_done=self._done,
            jobs_pending=self._jobs - self._done,
            bytes_pending=self._submitted_bytes - self._finished_bytes,
            bytes_written=self._bytes + (process.bytes_written if process else 0),
            fsyncs=self._fsyncs + (process.fsyncs if process else 0),
            process_id=process.pid if process else None,
        )

    def _set_error(self, error: BaseException) -> None:
        with self._error_lock:
            if self._error is None:
                self._error = error

    def _poll_due(self) -> bool:
        """Whether to read the process's answers now: at most every ``POLL_JOBS`` jobs,
        unless ``POLL_SECONDS`` have passed (reading them costs as much as sending a job)."""
        now = time.monotonic()
        if self._jobs < self._next_poll_job and now < self._next_poll_time:
            return False
        self._next_poll_job = self._jobs + POLL_JOBS
        self._next_poll_time = now + POLL_SECONDS
        return True

    def _take_error(self, *, poll: bool = True) -> BaseException | None:
        process = self._process
        if poll and process is not None and self._error is None:
            process.poll(wait=False)  # answers that came in: files written, or a failure
            if process.error is not None:
                self._set_error(process.error)
        error = self._error
        if error is None or self._delivered:
            return None
        self._delivered = True
        return error

    def _work(self) -> None:
        try:
            self._start_process()
        except BaseException as exc:
            self._set_error(exc)
        while True:
            entry = self._queue.get()
            if entry is None:
                self._close_process()
                return
            item, size = entry
            try:
                if isinstance(item, _Barrier):
                    if self._process is not None:
                        self._process.wait_answered()  # the frames sent before it
                elif self._error is None:  # after a failure, later snapshots are not written
                    self._write(item)
            except BaseException as exc:
                if isinstance(item, SnapshotJob):
                    add_note(exc, f"while writing the snapshot {item.path}")
                self._set_error(exc)
            self._finished_bytes += size
            self._finished += 1
            if isinstance(item, _Barrier):
                self._wake(item.reached)
            room = self._room
            behind = self._submitted_bytes - self._finished_bytes
            if room is not None and behind <= self.max_pending:
                self._room = None
                self._wake(room)

    def _close_process(self) -> None:
        """Let the process write what it was sent, and end. This thread started it, so it
        does: the process is killed when the thread that started it ends (its "parent" for
        ``PR_SET_PDEATHSIG``)."""
        process = self._process
        if process is None:
            return
        try:
            process.close()
        except BaseException as exc:
            self._set_error(exc)
        if process.error is not None:
            self._set_error(process.error)

    def _wake(self, event: anyio.Event) -> None:
        """Set ``event`` on the event loop's thread (this is the writer thread)."""
        with contextlib.suppress(anyio.RunFinishedError):  # gone, and whoever waited in it
            anyio.from_thread.run_sync(event.set, token=self._token)

    def _count_fsync(self, fd: int) -> None:
        self._fsync(fd)
        self._fsyncs += 1

    def _write(self, item: SnapshotJob | Frames) -> None:
        process = self._process
        if not isinstance(item, SnapshotJob):
            assert process is not None
            process.send_all(item)
            return
        ops = self._operations(item)
        if process is not None:
            process.send_all(process.encode(ops))
            return
        self._bytes += sum(op.apply(self._count_fsync) for op in ops)
