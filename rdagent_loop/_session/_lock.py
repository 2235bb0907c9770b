"""One run per session: an OS lock on ``<session>/.lock/pid``, held from a run's start to its end.

The lock is ``flock``, not ``fcntl``/``lockf`` record locks. A ``flock`` lock belongs to the
open file description: a second ``open`` of the file, in this process too, conflicts with it
(a record lock belongs to the process, so a second run in the same process would take it
again without noticing, and closing *any* descriptor of the file would drop it), a
descriptor handed to a child process keeps it, and the kernel frees it when the last
descriptor goes, however its holder dies: there are no stale locks to clean up. The file
holds the holder's pid, for the error message only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from .._compat import add_note
from .._errors import SessionBusyError
from ._atomic import ensure_dir

LOCK_FOLDER = ".lock"
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR)
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class SessionLock:
    """The lock of one session folder (``<trace_path>/__session__``)."""

    def __init__(self, session_folder: Path) -> None:
        self.folder = Path(session_folder)
        self.path = self.folder / LOCK_FOLDER / "pid"
        self.fd: int | None = None
        """The locked descriptor while the lock is held (a child given it holds it too)."""

    def acquire(self) -> None:
        """Take the lock, creating the session folder if missing; blocking file I/O.

        Raises :class:`SessionBusyError` when another run holds it, ``ValueError`` when the
        trace path cannot hold a session (it, or a folder on the way to it, is a file), and
        the ``OSError`` itself, with a note naming the trace path, when the disk refuses
        (read-only, no permission, full).
        """
        while True:
            try:
                # made durable, whatever the run's durability: once per run, and a session
                # folder lost to a power cut would take every fsynced file in it along
                ensure_dir(self.path.parent, "fsync")
                fd = os.open(self.path, _FLAGS, 0o644)
            except OSError as error:
                trace_path = self.folder.parent
                if error.errno not in _NOT_A_FOLDER:  # the disk's refusal: itself, explained
                    add_note(error, f"trace_path {trace_path} cannot hold a session")
                    raise
                reason = _reason(self.folder, error)
                raise ValueError(
                    f"trace_path {trace_path} cannot hold a session: {reason}"
                ) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
                text = os.pread(fd, 32, 0).strip()
                os.close(fd)
                raise SessionBusyError(self.folder, int(text) if text.isdigit() else None) from None
            # the file may have been removed (remove_lock) between our open and our flock
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Unlock and close (nothing to do when not held).

        The unlock is the open file description's: a child given the descriptor loses the
        lock too, so release once it is done.
        """
        fd, self.fd = self.fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _reason(session_folder: Path, error: OSError) -> str:
    """Why the session folder or its lock file could not be made, in a few words."""
    try:
        file = next((p for p in (session_folder, *session_folder.parents) if p.is_file()), None)
    except OSError:
        file = None
    if file is not None:
        return "it is a file" if file == session_folder.parent else f"{file} is a file"
    return f"{error.strerror or error}: {error.filename}" if error.filename else str(error)


def remove_lock(session_folder: Path) -> None:
    """Remove the lock's files when no run holds them (a run that saved nothing leaves
    nothing behind); blocking file I/O."""
    lock = SessionLock(session_folder)
    if not lock.path.exists():
        return
    try:
        lock.acquire()
    except (SessionBusyError, ValueError):
        return
    try:
        # an acquire that opened the file before it went sees that, and opens the new one
        with contextlib.suppress(OSError):
            os.unlink(lock.path)
            os.rmdir(lock.path.parent)
    finally:
        lock.release()
