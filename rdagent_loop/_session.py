"""Snapshots on disk: the file format, atomic writes, verified reads and the session layout.

Layout (RD-Agent's): ``<session_folder>/<loop_idx>/<step_idx>_<step_name>``. Each file is a
header line (magic, JSON metadata with a checksum) followed by the pickled loop object. A file
under its final name is complete: it is written to a temporary name, flushed, optionally
fsynced, renamed into place, and the folder fsynced.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pickle
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._errors import SnapshotError

MAGIC = b"RDLOOP-SNAPSHOT\n"
FORMAT_VERSION = 1
ENGINE_VERSION = "0.1.0"

_sequence = itertools.count()


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    format: int
    cls: str
    engine: str
    written_at_ns: int
    seq: int
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot file of a session, read without unpickling anything."""

    path: Path
    loop_idx: int
    step_idx: int
    step_name: str
    written_at_ns: int
    size: int
    valid: bool
    problem: str | None = None


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(obj: Any) -> bytes:
    """Pickle ``obj`` and put a verifiable header in front of it."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    header = {
        "format": FORMAT_VERSION,
        "cls": qualified_name(type(obj)),
        "engine": ENGINE_VERSION,
        "written_at_ns": time.time_ns(),
        "seq": next(_sequence),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
    }
    return MAGIC + json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def write_atomic(path: Path, data: bytes, durability: Literal["fsync", "flush"]) -> None:
    """Write ``data`` so that ``path`` is either complete or absent, whatever happens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            if durability == "fsync":
                os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durability == "fsync":
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: Path) -> tuple[SnapshotHeader, int]:
    """Read and check the header; return it and the payload's offset. Never unpickles."""
    with path.open("rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise SnapshotError(f"{path} is not an rdagent_loop snapshot (bad magic)")
        line = f.readline(4096)
    try:
        raw = json.loads(line)
        header = SnapshotHeader(**raw)
    except (ValueError, TypeError) as exc:
        raise SnapshotError(f"{path} has a corrupt header: {exc}") from None
    if header.format != FORMAT_VERSION:
        raise SnapshotError(f"{path} has snapshot format {header.format}, expected {FORMAT_VERSION}")
    return header, len(MAGIC) + len(line)


def read_payload(path: Path) -> tuple[SnapshotHeader, bytes]:
    """The verified payload of a snapshot (size and checksum checked)."""
    header, offset = read_header(path)
    with path.open("rb") as f:
        f.seek(offset)
        payload = f.read()
    if len(payload) != header.size:
        raise SnapshotError(
            f"{path} is truncated: {len(payload)} of {header.size} payload bytes"
        )
    if hashlib.sha256(payload).hexdigest() != header.sha256:
        raise SnapshotError(f"{path} failed its checksum")
    return header, payload


def load_file(path: Path, expected: type) -> Any:
    """Unpickle a verified snapshot of class ``expected`` (or a subclass)."""
    header, payload = read_payload(path)
    expected_name = qualified_name(expected)
    if header.cls != expected_name:
        # a subclass or superclass is fine; another class is not
        module_ok = any(qualified_name(c) == header.cls for c in expected.__mro__) or any(
            qualified_name(c) == header.cls for c in _all_subclasses(expected)
        )
        if not module_ok:
            raise SnapshotError(
                f"{path} holds a snapshot of {header.cls}, not of {expected_name}"
            )
    try:
        return pickle.loads(payload)
    except (ModuleNotFoundError, AttributeError, ImportError) as exc:
        raise SnapshotError(
            f"{path} holds a snapshot of {header.cls} that cannot be loaded: {exc}"
        ) from exc


def _all_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def session_folder_of(path: Path) -> Path:
    """The ``__session__`` folder for a trace path, a session folder or a snapshot file."""
    if path.is_file():
        return path.parent.parent
    if (path / "__session__").is_dir():
        return path / "__session__"
    return path


def snapshot_files(session_folder: Path) -> Iterator[tuple[Path, int, int, str]]:
    """Every ``<loop>/<step>_<name>`` file of a session, with its parsed name."""
    if not session_folder.is_dir():
        return
    for loop_dir in session_folder.iterdir():
        if not (loop_dir.is_dir() and loop_dir.name.isdigit()):
            continue
        for file in loop_dir.iterdir():
            step, sep, name = file.name.partition("_")
            if sep and step.isdigit() and file.is_file():
                yield file, int(loop_dir.name), int(step), name


def list_snapshots(session_folder: Path) -> list[SnapshotInfo]:
    """All snapshots of a session in the order they were written, each checked for integrity."""
    infos = []
    for file, li, si, name in snapshot_files(session_folder):
        try:
            header, _ = read_payload(file)
        except (SnapshotError, OSError) as exc:
            stat = file.stat()
            infos.append(
                SnapshotInfo(file, li, si, name, stat.st_mtime_ns, stat.st_size, False, str(exc))
            )
        else:
            infos.append(
                SnapshotInfo(file, li, si, name, header.written_at_ns, file.stat().st_size, True)
            )
    infos.sort(key=lambda i: (i.written_at_ns, i.loop_idx, i.step_idx))  # ns clock: no ties in practice
    return infos


def newest_valid(session_folder: Path) -> Path:
    """The newest snapshot that passes its checks; warn about newer broken ones."""
    infos = list_snapshots(session_folder)
    for info in reversed(infos):
        if info.valid:
            return info.path
        warnings.warn(
            f"skipping broken snapshot {info.path}: {info.problem}", RuntimeWarning, stacklevel=3
        )
    raise FileNotFoundError(f"no valid snapshot in session folder {session_folder}")


def truncate_after(session_folder: Path, kept: Path) -> list[Path]:
    """Delete the snapshots written after ``kept`` (a checkout); return what was deleted."""
    infos = list_snapshots(session_folder)
    order = [i.path for i in infos]
    if kept not in order:
        return []
    later = order[order.index(kept) + 1 :]
    for path in later:
        path.unlink(missing_ok=True)
    return later
