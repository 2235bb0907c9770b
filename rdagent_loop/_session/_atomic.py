"""Atomic file writes: a file under its final name is complete or absent.

Each file is written to a temporary name in the same folder, flushed, fsynced when
``durability == "fsync"``, renamed into place, and the folder fsynced, like SQLite's
``synchronous=FULL``. ``"flush"`` skips both fsyncs: it survives a killed process (the data
is in the page cache once ``write`` returns) but not a power cut.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

Durability = Literal["fsync", "flush"]

_names = itertools.count()


def _replace(src: str, dst: Path) -> None:
    """The rename that publishes a file (a seam for tests that fail between write and rename)."""
    os.replace(src, dst)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: Path, durability: Durability) -> None:
    """Create ``folder`` and its missing parents; with fsync, make the new entries durable."""
    if folder.is_dir():
        return
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        if durability == "fsync":
            fsync_dir(path.parent)


def temp_name(folder: Path) -> Path:
    """A hidden temporary name; no ``_`` in it, so RD-Agent's ``*/*_*`` globs never see it."""
    return folder / f".tmp-{os.getpid()}-{next(_names)}-{os.urandom(4).hex()}"


def write_atomic(
    path: Path,
    parts: Iterable[bytes | memoryview],
    durability: Durability,
    *,
    sync_dir: bool = True,
    make_dir: bool = False,
) -> int:
    """Write the concatenation of ``parts`` to ``path`` atomically; return the bytes written.

    ``sync_dir=False`` leaves the folder's fsync to the caller (one for many files);
    ``make_dir=True`` creates the folder if it is missing.
    """
    tmp = temp_name(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        if not make_dir:
            raise
        ensure_dir(path.parent, durability)
        fd = os.open(tmp, flags, 0o644)
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
                os.fsync(fd)
        finally:
            os.close(fd)
        _replace(str(tmp), path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durability == "fsync" and sync_dir:
        fsync_dir(path.parent)
    return written
