"""The run's snapshot writer: disk work off the event loop's thread, in order, drained at exit.

``dump()`` captures the state synchronously and hands the job over; one thread, started on
the first job and joined when the run ends (shielded from cancellation, so a run never
returns with a snapshot still in flight), writes the jobs in the order they were taken. If
the disk falls behind by more than ``max_pending`` bytes, ``submit`` waits for it, so memory
stays bounded. A failed write is raised by the next ``submit`` (the run then fails on the
step that tried to save), or when the run ends.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import anyio

from ._capture import SnapshotJob

log = logging.getLogger("rdagent_loop")


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


class SnapshotWriter:
    """Writes the snapshots of one ``run()`` on a thread of its own (an async context manager)."""

    def __init__(self, *, max_pending: int = 256 * 1024 * 1024) -> None:
        self.max_pending = max_pending
        self._queue: queue.SimpleQueue[SnapshotJob | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._waiting = 0
        self._thread: threading.Thread | None = None
        self._open = False
        self._error: BaseException | None = None
        self._delivered = False
        # Counters without a shared lock: each is written by one thread only (submitted by
        # the submitter, finished by the writer), because a lock shared with a thread that
        # loses the GIL at every system call would make the event loop wait for it.
        self._submitted = self._submitted_bytes = 0
        self._finished = self._finished_bytes = 0
        self._done = 0
        self._bytes = self._new = self._reused = 0
        self._busy = 0.0

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
        if thread is not None:
            self._queue.put(None)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
        error = self._take_error()
        if error is not None:
            if exc is None:
                raise error
            log.error("a snapshot could not be written: %r", error)

    def submit(self, job: SnapshotJob) -> bool:
        """Queue ``job``; False if the writer is not running (the caller writes it itself).

        After a failed write, the error is raised once; later jobs are left to the caller.
        """
        error = self._take_error()
        if error is not None:
            raise error
        if not self._open or self._error is not None:
            return False
        size = job.nbytes
        if self._submitted_bytes - self._finished_bytes + size > self.max_pending:
            self._wait(
                lambda: (
                    self._submitted_bytes - self._finished_bytes + size <= self.max_pending
                    or self._submitted == self._finished
                )
            )
        self._submitted += 1
        self._submitted_bytes += size
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="rdagent-loop-snapshots", daemon=True
            )
            self._thread.start()
        self._queue.put(job)
        return True

    def flush(self) -> None:
        """Block until every queued snapshot is on disk; raise a write error if one happened."""
        self._wait(lambda: self._submitted == self._finished)
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
        return WriterStatistics(
            jobs_done=self._done,
            jobs_pending=self._submitted - self._finished,
            bytes_pending=self._submitted_bytes - self._finished_bytes,
            bytes_written=self._bytes,
            chunks_written=self._new,
            chunks_reused=self._reused,
            busy_seconds=self._busy,
        )

    def _take_error(self) -> BaseException | None:
        error = self._error
        if error is None or self._delivered:
            return None
        self._delivered = True
        return error

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:  # after a failure, later snapshots are not written
                try:
                    stats = job.run()
                except BaseException as exc:
                    note = getattr(exc, "add_note", None)  # Python 3.11+
                    if note is not None:
                        note(f"while writing the snapshot {job.path}")
                    self._error = exc
                else:
                    self._done += 1
                    self._bytes += stats.bytes_written
                    self._new += stats.chunks_written
                    self._reused += stats.chunks_reused
                    self._busy += stats.seconds
            self._finished_bytes += job.nbytes
            self._finished += 1
            if self._waiting:
                with self._cond:
                    self._cond.notify_all()
