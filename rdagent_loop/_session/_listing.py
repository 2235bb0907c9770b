"""A session's snapshots, listed and checked without unpickling anything; checkout's
truncation; the clean-up of what a killed run left half written."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._errors import SnapshotError
from ._capture import TMP_NAME
from ._chunks import STORE_NAME
from ._format import read_manifest, signing_key
from ._reader import newest_first, order_of


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
    manifest, signature (with the signing key of ``settings``, else of ``LoopSettings()``),
    and the files it points at (present with their size; ``deep=True`` also hashes them) all
    pass: only manifests are read (``deep=True`` reads and hashes what they point at).
    Nothing is unpickled and no class is imported.
    """
    if settings is None:
        from .._settings import LoopSettings

        settings = LoopSettings()
    key = signing_key(settings.signing_key)
    infos = []
    for file, li, si, name in snapshot_files(session_folder_of(Path(session))):
        state_size = 0
        cls = None
        try:
            with file.open("rb") as f:
                manifest = read_manifest(f, file, key)
            written, seq = manifest.order
            cls = manifest.cls
            state_size = _check_refs(file, manifest.fields, deep)
            problem = None
        except (SnapshotError, OSError) as exc:
            (written, seq), _, _ = order_of(file)
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
                cls=cls,
                seq=seq,
                state_size=state_size,
            )
        )
    infos.sort(key=lambda i: (i.written_at_ns, i.seq, i.loop_idx, i.step_idx))
    return infos


def truncate_after(session_folder: Path, kept: Path) -> list[Path]:
    """Delete the snapshot files written after ``kept`` (a checkout); return what was deleted.

    The store is left alone: older snapshots share it.
    """
    order = {file: order_of(file)[0] for file, *_ in snapshot_files(session_folder)}
    if kept not in order:
        return []
    later = sorted((p for p, at in order.items() if at > order[kept]), key=order.__getitem__)
    for path in later:
        path.unlink(missing_ok=True)
    return later


def _check_refs(file: Path, fields: dict[str, Any], deep: bool) -> int:
    """Check that what the manifest points at directly is in the store; return the bytes of
    pickled attributes. ``deep``: read the whole step file and everything, hashes checked."""
    if deep:
        from ._reader import read_snapshot

        read_snapshot(file, None).verify()
    store = file.parent.parent / STORE_NAME
    size = 0
    refs: list[tuple[int, str]] = []
    for _, pieces, blobs in fields["attrs"]:
        for piece in pieces:
            size += int(piece[0])
            if len(piece) > 1:
                refs.append((int(piece[0]), str(piece[1])))
        refs += [(int(n), str(sha)) for sha, n in blobs]
    loops = fields.get("loops") or {}
    if loops.get("chain"):
        refs.append((int(loops["chain"][0]), str(loops["chain"][1])))
    refs += [(int(n), str(sha[0])) for _, n, *sha in loops.get("open", ()) if sha]
    for expected, sha in refs:
        try:
            actual = (store / sha).stat().st_size
        except FileNotFoundError:
            raise SnapshotError(f"{file}: {store / sha} is missing") from None
        if actual != expected:
            raise SnapshotError(f"{file}: {store / sha} has the wrong size")
    return size


def remove_orphans(session_folder: Path) -> int:
    """Remove what a killed run left half written; return how many files went.

    Temporary files are never complete. A file of the store written after the newest step
    file is referred to by no step file (a step file is written after everything it points
    at, the writer writes one job at a time, and it never rewrites a file the store has):
    its snapshot was never completed. Only a run that holds the session's lock calls this.
    """
    removed = 0
    tmp = session_folder / TMP_NAME
    for entry in _entries(tmp):
        os.unlink(entry.path)
        removed += 1
    group = next(iter(newest_first(session_folder)), [])
    newest = max((p.stat().st_mtime_ns for p in group), default=-1)
    for entry in _entries(session_folder / STORE_NAME):
        if entry.stat().st_mtime_ns > newest:
            os.unlink(entry.path)
            removed += 1
    return removed


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return [e for e in os.scandir(folder) if e.is_file()]
    except FileNotFoundError:
        return []
