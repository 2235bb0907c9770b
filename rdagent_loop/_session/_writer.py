"""The run's snapshot writer: disk work off the event loop's thread, in order, drained at exit.

``dump()`` captures the state synchronously and hands the job over. Where it can (Linux),
the writer builds the files' bytes right there and sends them to a writer *process*
(``_writer_process.py``), which writes them in parallel: a thread of this process would
have to win the GIL back from a busy event loop after every system call. Jobs that need
slow work first (cutting and hashing large segments into chunks), and whatever the pipe
to the process cannot take at once, go to the writer thread, which sends them on in
order; elsewhere (or with ``snapshot_writer="thread"``) the thread writes the files itself.

The thread starts with the first job it gets; the run waits for the thread and the
process when it ends (shielded from cancellation, so a run never returns with a snapshot
still in flight). If the thread falls behind by more than ``max_pending`` bytes,
``submit`` waits for it, so memory stays bounded. A failed write is raised by the next
``submit`` (the run then fails on the step that tried to save), or when the run ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

import anyio

from .._compat import add_note
from ._atomic import FileOp
from ._capture import SnapshotJob
from ._writer_process import Frames, WriterProcess, available

log = logging.getLogger("rdagent_loop")

WriterMode = Literal["auto", "process", "thread"]
POLL_JOBS = 16
POLL_SECONDS = 0.05
_Item = SnapshotJob | Frames  # a job to build and send, or frames to send


@dataclass(frozen=True, slots=True)
class WriterStatistics:
    """What a snapshot writer has done so far."""

    jobs_done: int
    jobs_pending: int
    bytes_pending: int
    bytes_written: int
    chunks_written: int
    chunks_reused: int
    busy_seconds: float
    process_id: int | None  # of the writer process, if there is one


class SnapshotWriter:
    """Writes the snapshots of one ``run()`` off the event loop's thread.

    An async context manager: leaving it waits until everything handed over is on disk.
    """

    def __init__(self, *, mode: WriterMode = "auto", max_pending: int = 256 * 1024 * 1024) -> None:
        if mode not in ("auto", "process", "thread"):
            raise ValueError(f"mode must be 'auto', 'process' or 'thread', got {mode!r}")
        self.mode = mode
        self.max_pending = max_pending
        self._queue: queue.SimpleQueue[tuple[_Item, int] | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._process: WriterProcess | None = None
        self._use_process: bool | None = None  # decided at the first job
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
        self._done = self._new = self._reused = 0
        self._bytes = 0
        self._busy = 0.0
        self._next_poll_job = 0
        self._next_poll_time = 0.0

    async def __aenter__(self) -> SnapshotWriter:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        thread, self._thread = self._thread, None
        if thread is not None or self._process is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._finish, thread)
        error = self._take_error()
        if error is not None:
            if exc is None:
                raise error
            log.error("a snapshot could not be written: %r", error)

    def _finish(self, thread: threading.Thread | None) -> None:
        """Let the thread, then the process, write everything they were given."""
        if thread is not None:
            self._queue.put(None)
            thread.join()
        process = self._process
        if process is not None:
            process.close()
            if process.error is not None:
                self._set_error(process.error)

    def submit(self, job: SnapshotJob) -> bool:
        """Hand ``job`` over; False if the writer is not running (the caller writes it itself).

        After a failed write, the error is raised once; later jobs are left to the caller.
        """
        error = self._take_error(poll=self._poll_due())
        if error is not None:
            raise error
        if not self._open or self._error is not None:
            if self._error is not None and job.index is not None:
                job.index.forget()  # it counts chunks of jobs that were dropped as stored
            return False
        size = job.nbytes
        if self._submitted_bytes - self._finished_bytes + size > self.max_pending:
            self._wait(
                lambda: (
                    self._submitted_bytes - self._finished_bytes + size <= self.max_pending
                    or self._submitted == self._finished
                )
            )
        self._jobs += 1
        process = self._process if self._use_process is not None else self._start_process()
        if process is None or job.chunked:
            self._hand_to_thread(job, size)  # slow to build: the thread does it
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

    def _start_process(self) -> WriterProcess | None:
        self._use_process = False
        if self.mode == "thread" or (self.mode == "auto" and not available()):
            return None
        try:
            self._process = WriterProcess()
        except OSError as exc:
            if self.mode == "process":
                raise
            log.info("no snapshot writer process (%r): writing on a thread", exc)
            return None
        self._use_process = True
        return self._process

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
        """The job's files. Chunked jobs are built by the writer thread only, others by the
        submitter only (while the thread may build a chunked one), so each chunk counter
        has one writer. The ``done`` of the last file holds no reference to the job, which
        can go as soon as its bytes are sent."""
        ops = job.operations(self._job_done)
        if job.chunks_written or job.chunks_reused:
            self._new += job.chunks_written
            self._reused += job.chunks_reused
        return ops

    def _job_done(self) -> None:
        self._done += 1

    def flush(self) -> None:
        """Block until every snapshot handed over is on disk; raise a failed write's error."""
        self._wait(lambda: self._submitted == self._finished)
        if self._process is not None:
            self._process.wait_answered()
        error = self._take_error()
        if error is not None:
            raise error

    def _wait(self, done: Callable[[], bool]) -> None:
        with self._cond:
            self._waiting += 1
            try:
                while not done():
                    self._cond.wait(0.05)  # a timeout: a notification may come just before
            finally:
                self._waiting -= 1

    def statistics(self) -> WriterStatistics:
        process = self._process
        return WriterStatistics(
            jobs_done=self._done,
            jobs_pending=self._jobs - self._done,
            bytes_pending=self._submitted_bytes - self._finished_bytes,
            bytes_written=self._bytes + (process.bytes_written if process else 0),
            chunks_written=self._new,
            chunks_reused=self._reused,
            busy_seconds=self._busy + (process.busy_ns / 1e9 if process else 0.0),
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
            process.poll()  # answers that came in: files written, or a failure
            if process.error is not None:
                self._set_error(process.error)
        error = self._error
        if error is None or self._delivered:
            return None
        self._delivered = True
        return error

    def _work(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            item, size = entry
            if self._error is None:  # after a failure, later snapshots are not written
                try:
                    self._write(item)
                except BaseException as exc:
                    if isinstance(item, SnapshotJob):
                        add_note(exc, f"while writing the snapshot {item.path}")
                    self._set_error(exc)
            self._finished_bytes += size
            self._finished += 1
            if self._waiting:
                with self._cond:
                    self._cond.notify_all()

    def _write(self, item: _Item) -> None:
        process = self._process
        if not isinstance(item, SnapshotJob):
            assert process is not None
            process.send_all(item)
            return
        ops = self._operations(item)
        if process is not None:
            process.send_all(process.encode(ops))
            return
        started = time.perf_counter()
        self._bytes += sum(op.apply() for op in ops)
        self._busy += time.perf_counter() - started
