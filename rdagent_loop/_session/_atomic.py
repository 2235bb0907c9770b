"""Atomic file writes: a file under its final name is complete or absent.

Each file is written to a temporary name in the same folder, flushed, fsynced when
``durability == "fsync"``, renamed into place, and the folder fsynced, like SQLite's
``synchronous=FULL``. ``"flush"`` skips both fsyncs: it survives a killed process (the data
is in the page cache once ``write`` returns) but not a power cut.

Every function that fsyncs takes the ``fsync`` to call (``os.fsync`` unless a test passes a
counting one), so that a test can see that each file and folder was made durable.
"""

from __future__ import annotations

import itertools
import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and pathlib would double the writer process's start-up time
    from collections.abc import Callable, Iterable
    from pathlib import Path
    from typing import Literal

    Durability = Literal["fsync", "flush"]
    Fsync = Callable[[int], None]
else:
    Durability = str

_names = itertools.count()
_pid = os.getpid()


def _forked() -> None:
    global _pid, _names
    _pid, _names = os.getpid(), itertools.count()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def _replace(src: str, dst: str) -> None:
    """The rename that publishes a file (a seam for tests that fail between write and rename)."""
    os.replace(src, dst)


def fsync_dir(folder: str | Path, fsync: Fsync = os.fsync) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: str | Path, durability: Durability, fsync: Fsync = os.fsync) -> None:
    """Create ``folder`` and its missing parents; with fsync, make the new entries durable.

    ``mkdir`` first: the usual case is a folder that exists, or only it missing (a new loop's
    folder, at every loop's first snapshot), one system call either way.
    """
    folder = os.fspath(folder)
    try:
        os.mkdir(folder)
    except FileExistsError:
        return
    except FileNotFoundError:
        parent = os.path.dirname(os.path.normpath(folder))
        if not parent or parent == folder:
            raise
        ensure_dir(parent, durability, fsync)
        try:
            os.mkdir(folder)
        except FileExistsError:
            return
    if durability == "fsync":
        fsync_dir(os.path.dirname(os.path.normpath(folder)) or os.curdir, fsync)


def temp_name(folder: str) -> str:
    """A hidden temporary name, unique in this process; no ``_`` in it, so RD-Agent's
    ``*/*_*`` globs never see it. ``O_EXCL`` catches a leftover of a dead process."""
    return f"{folder}{os.sep}.tmp-{_pid}-{next(_names)}"


def _create(folder: str) -> tuple[str, int]:
    """A new temporary file in ``folder``: its name and an open descriptor."""
    while True:
        tmp = temp_name(folder)
        try:
            return tmp, os.open(tmp, _FLAGS, 0o644)
        except FileExistsError:  # left by a crashed process that had our pid: next name
            continue


def write_atomic(
    path: str | Path,
    parts: Iterable[bytes | bytearray | memoryview],
    durability: Durability,
    *,
    sync_dir: bool = True,
    make_dir: bool = False,
    tmp_dir: str | None = None,
    if_absent: bool = False,
    fsync: Fsync = os.fsync,
) -> int:
    """Write the concatenation of ``parts`` to ``path`` atomically; return the bytes written.

    ``sync_dir=False`` leaves the folder's fsync to the caller (one for many files);
    ``make_dir=True`` creates the folder if it is missing. The temporary file is made in
    ``tmp_dir`` (on the same file system), else beside ``path``: a session keeps its own in
    ``.tmp``, so a loop folder never holds anything but step files. Strings, not ``Path``
    objects, inside: this runs once per snapshot, and every system call here hands the GIL over.
    ``if_absent=True`` (files named by their content) leaves a file of the same size there as
    it is: its time of writing then still says which snapshot wrote it (``remove_orphans``).
    """
    target = os.fspath(path)
    folder = os.path.dirname(target) or os.curdir
    if if_absent:
        try:
            if os.stat(target).st_size == sum(map(len, parts := list(parts))):
                return 0
        except FileNotFoundError:
            pass
    scratch = tmp_dir or folder
    try:
        tmp, fd = _create(scratch)
    except FileNotFoundError:
        if not make_dir:
            raise
        ensure_dir(scratch, durability, fsync)
        tmp, fd = _create(scratch)
    written = 0
    try:
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            if durability == "fsync":
                fsync(fd)
        finally:
            os.close(fd)
        try:
            _replace(tmp, target)
        except FileNotFoundError:
            if not make_dir or scratch == folder:
                raise
            ensure_dir(folder, durability, fsync)  # a new loop's folder
            _replace(tmp, target)
    except BaseException:
        try:  # noqa: SIM105 (contextlib would slow the writer process's start)
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durability == "fsync" and sync_dir:
        fsync_dir(folder, fsync)
    return written


class FileOp:
    """One file to write atomically, or (``data is None``) one folder to fsync.

    What a snapshot job hands to whoever does its disk work: this thread, the writer thread,
    or the writer process. ``done`` is called once the file is on disk.
    """

    __slots__ = (
        "data",
        "done",
        "durability",
        "if_absent",
        "make_dir",
        "path",
        "sync_dir",
        "tmp_dir",
    )

    def __init__(
        self,
        path: str,
        data: bytes | bytearray | memoryview | list[bytes] | None,
        durability: Durability,
        *,
        sync_dir: bool = True,
        make_dir: bool = False,
        tmp_dir: str | None = None,
        if_absent: bool = False,
        done: Callable[[], None] | None = None,
    ) -> None:
        self.path = path
        self.if_absent = if_absent
        self.tmp_dir = tmp_dir
        self.data = data
        self.durability = durability
        self.sync_dir = sync_dir
        self.make_dir = make_dir
        self.done = done

    def apply(self, fsync: Fsync = os.fsync) -> int:
        """Do it here and now; return the bytes written."""
        if self.data is None:
            fsync_dir(self.path, fsync)
            written = 0
        else:
            written = write_atomic(
                self.path,
                self.data if isinstance(self.data, list) else [self.data],
                self.durability,
                sync_dir=self.sync_dir,
                make_dir=self.make_dir,
                tmp_dir=self.tmp_dir,
                if_absent=self.if_absent,
                fsync=fsync,
            )
        if self.done is not None:
            self.done()
        return written
