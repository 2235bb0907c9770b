"""A session's snapshots, listed and checked without unpickling anything; checkout's truncation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._errors import SnapshotError
from ._format import signing_key
from ._reader import order_of, read_snapshot


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot file of a session, as :func:`list_snapshots` found it."""

    path: Path
    loop_idx: int
    step_idx: int
    step_name: str
    written_at_ns: int
    """Time of writing (from the header; the file's mtime if the header is unreadable)."""
    size: int
    """Bytes of the snapshot file itself (chunks shared with other snapshots not counted)."""
    valid: bool
    problem: str | None = None
    cls: str | None = None
    """The loop class, ``module:qualname``."""
    seq: int = 0
    state_size: int = 0
    """Bytes of pickled state the snapshot restores, wherever they are stored."""

    @property
    def written_at(self) -> datetime:
        return datetime.fromtimestamp(self.written_at_ns / 1e9, timezone.utc)


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
        if not (loop_dir.name.isdigit() and loop_dir.is_dir()):
            continue
        for file in loop_dir.iterdir():
            step, sep, name = file.name.partition("_")
            if sep and step.isdigit() and file.is_file():
                yield file, int(loop_dir.name), int(step), name


def list_snapshots(
    session: str | Path, *, deep: bool = False, settings: Any | None = None
) -> list[SnapshotInfo]:
    """Every snapshot of a session, oldest first by time of writing, each checked.

    ``session`` is a trace path or its ``__session__`` folder. A snapshot is valid when its
    header, signature (with the signing key of ``settings``, else of ``LoopSettings()``),
    body checksum and chunks (present with their size; ``deep=True`` also hashes them) all
    pass. Nothing is unpickled and no class is imported.
    """
    if settings is None:
        from .._settings import LoopSettings

        settings = LoopSettings()
    key = signing_key(settings.signing_key)
    infos = []
    for file, li, si, name in snapshot_files(session_folder_of(Path(session))):
        (written, seq), header, problem = order_of(file)
        state_size = 0
        if problem is None:
            try:
                snapshot = read_snapshot(file, key)
                snapshot.check_chunks(deep)
                state_size = snapshot.state_size
            except (SnapshotError, OSError) as exc:
                problem = str(exc)
        try:
            size = file.stat().st_size
        except OSError:
            size = 0
        infos.append(
            SnapshotInfo(
                path=file,
                loop_idx=li,
                step_idx=si,
                step_name=name,
                written_at_ns=written,
                size=size,
                valid=problem is None,
                problem=problem,
                cls=header.cls if header is not None else None,
                seq=seq,
                state_size=state_size,
            )
        )
    infos.sort(key=lambda i: (i.written_at_ns, i.seq, i.loop_idx, i.step_idx))
    return infos


def truncate_after(session_folder: Path, kept: Path) -> list[Path]:
    """Delete the snapshot files written after ``kept`` (a checkout); return what was deleted.

    Chunks and loop outputs are left alone: older snapshots may share them.
    """
    order = {file: order_of(file)[0] for file, *_ in snapshot_files(session_folder)}
    if kept not in order:
        return []
    later = sorted((p for p, at in order.items() if at > order[kept]), key=order.__getitem__)
    for path in later:
        path.unlink(missing_ok=True)
    return later
