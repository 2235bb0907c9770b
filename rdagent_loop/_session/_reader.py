"""Reading a step file back: verify all of it, then (and only then) unpickle.

Order of checks: the footer and manifest (format, signature), the file's checksum, every
chunk, blob and page it points at (each against its SHA-256), the loop class (imported by
name only now), and last the unpickling itself, whose import errors become a
``SnapshotError`` naming the snapshot, the class and what is missing. The state is then
migrated and its loops placed on the class's steps by name (``_placement.py``).

``assemble`` is what a plain ``pickle.load`` of a step file calls (see ``_format.py``).
"""

from __future__ import annotations

import copyreg
import hashlib
import importlib
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import SnapshotError, SnapshotWarning
from .._loops import LoopMap, no_value
from ._blobs import loads
from ._capture import TMP_NAME, Saved
from ._chunks import STORE_NAME, ChunkIndex, read_chunk
from ._format import (
    Manifest,
    OldFormatError,
    qualified_name,
    read_body,
    read_manifest,
    signing_key,
)
from ._pages import LoopPages, PageEntry, PageRef, parse_page
from ._placement import Placement, place

log = logging.getLogger("rdagent_loop")

_FACTORIES: dict[str, Callable[[], Any]] = {
    "step_idx": int,
    "loop_prev_out": dict,
    "loop_trace": list,
    "withdraw_base": no_value,
}


@dataclass
class _Store:
    """Files of a session's store, each read once and checked against its hash."""

    folder: Path | None
    what: Path
    files: dict[str, bytes] = field(default_factory=dict)

    def get(self, sha: str, size: int) -> bytes:
        data = self.files.get(sha)
        if data is None:
            if self.folder is None:
                raise SnapshotError(f"{self.what} refers to stored data but is not in a session")
            try:
                data = read_chunk(self.folder, sha, size)
            except SnapshotError as exc:
                raise SnapshotError(f"{self.what}: {exc}") from None
            self.files[sha] = data
        return data


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A step file whose manifest and checksum passed (what it points at not read yet)."""

    path: Path
    manifest: Manifest
    body: bytes

    @property
    def session(self) -> Path | None:
        """Where its store is: the session this file lies in (wherever it was written)."""
        if not self.manifest.fields.get("per_loop") and not self._stored():
            return None
        return self.path.parent.parent

    def _stored(self) -> bool:
        attrs = self.manifest.fields["attrs"]
        return any(len(p) > 1 or refs for _, pieces, refs in attrs for p in pieces)

    @property
    def state_size(self) -> int:
        """Bytes of pickled attributes (loop records not counted)."""
        return sum(int(p[0]) for _, pieces, _ in self.manifest.fields["attrs"] for p in pieces)

    def verify(self) -> Verified:
        """Read and check everything this file points at (nothing is unpickled)."""
        fields = self.manifest.fields
        folder = self.session
        store = _Store(None if folder is None else folder / STORE_NAME, self.path)
        try:
            segments, offset = self._segments(store)
            body = memoryview(self.body)[offset:]
            records, pages = _records(store, fields.get("loops"), body)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SnapshotError(f"{self.path} has a corrupt manifest: {exc!r}") from None
        return Verified(self, store, segments, records, pages)

    def load(self, expected: type) -> Any:
        """The loop object, an instance of ``expected`` or of a subclass of it."""
        return self.verify().build(expected)

    def _segments(self, store: _Store) -> tuple[list[tuple[str, bytes]], int]:
        """Every attribute's pickle, and every blob they refer to, read and checked; and
        where the inline bytes after them start."""
        body = memoryview(self.body)
        offset = self.manifest.body_offset
        segments = []
        for name, pieces, refs in self.manifest.fields["attrs"]:
            parts: list[bytes | memoryview] = []
            for piece in pieces:
                size = int(piece[0])
                if len(piece) == 1:
                    parts.append(body[offset : offset + size])
                    offset += size
                else:
                    parts.append(store.get(str(piece[1]), size))
            for sha, size in refs:
                store.get(str(sha), int(size))
            segments.append((str(name), b"".join(parts)))
        return segments, offset

    def _seed(self, folder: Path, store: _Store, pages: LoopPages) -> Saved:
        """What this snapshot proves the session holds: the next snapshot builds on it."""
        index = ChunkIndex(folder / STORE_NAME)
        chunked = [
            (str(name), [(int(p[0]), str(p[1])) for p in pieces])
            for name, pieces, _ in self.manifest.fields["attrs"]
            if all(len(p) > 1 for p in pieces)
        ]
        index.seed(chunked, store.files)
        return Saved(os.fspath(folder), index, pages)


@dataclass
class Verified:
    """A step file and everything it points at, read and checked: safe to unpickle."""

    snapshot: Snapshot
    store: _Store
    segments: list[tuple[str, bytes]]
    records: dict[int, PageEntry]
    pages: LoopPages

    def build(self, expected: type) -> Any:
        """The loop object, an instance of ``expected`` or of a subclass of it."""
        snapshot, fields = self.snapshot, self.snapshot.manifest.fields
        cls = resolve_class(snapshot.path, snapshot.manifest.cls, expected)
        name = ""
        try:
            state: Any = {}
            for name, data in self.segments:
                state[name] = loads(data, self.store.get)
            if fields["state"] == "object":
                state = state[""]
            else:
                name = "per-loop state"
                state.update(_maps(fields.get("per_loop") or (), self.records, self.store))
        except (ImportError, AttributeError) as exc:
            where = f"attribute {name!r}" if name else "the state"
            raise SnapshotError(
                f"{snapshot.path} holds a snapshot of {snapshot.manifest.cls}, but {where} "
                f"cannot be rebuilt: {exc} (was a module or class it uses renamed or moved?)"
            ) from exc
        state, placement = place(cls, state, snapshot.manifest, snapshot.path)
        obj = instantiate(cls, state)
        if isinstance(getattr(obj, "__dict__", None), dict):
            obj.__dict__["_placement"] = placement
            folder = snapshot.session
            # after a migration or a change of steps the loops' records are not the ones
            # stored (finished loops among them): the next snapshot writes them all again
            if folder is not None and not (placement.migrated or placement.steps_changed):
                obj.__dict__["_saved"] = snapshot._seed(folder, self.store, self.pages)
        if placement.migrated or placement.moved:
            _log_placement(snapshot.path, placement)
        return obj


def _log_placement(path: Path, placement: Placement) -> None:
    what = []
    if placement.migrated:
        what.append(
            f"migrated from session_version {placement.saved_version} to {placement.version}"
        )
    if placement.moved:
        what.append(
            "loops placed by step name: "
            + ", ".join(
                f"{m.loop_idx} at {m.step!r}" if m.step else f"{m.loop_idx} finished"
                for m in placement.moved[:8]
            )
            + (", ..." if len(placement.moved) > 8 else "")
        )
    log.info("loaded %s into %s: %s", path, placement.cls, "; ".join(what))


def instantiate(cls: type, state: Any) -> Any:
    """An object of ``cls`` with ``state``, as unpickling builds one."""
    obj: Any = copyreg.__newobj__(cls)  # type: ignore[attr-defined]
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
    else:
        obj.__dict__.update(state)
    return obj


def _records(
    store: _Store, loops: Any, inline: memoryview
) -> tuple[dict[int, PageEntry], LoopPages]:
    """Every loop's record entry (newest wins), and the pages' state to continue from.
    ``inline``: the step file's bytes after the attributes (its open pages, if it holds
    them)."""
    pages = LoopPages()
    records: dict[int, PageEntry] = {}
    if not loops:
        if len(inline):
            raise ValueError("inline sizes do not add up")
        return records, pages
    ref = loops["chain"]
    pages.chain = None if ref is None else PageRef(size=int(ref[0]), sha=str(ref[1]))
    pages.sealed = int(loops["sealed"])
    while ref is not None:
        size, sha = int(ref[0]), str(ref[1])
        ref, entries = parse_page(store.get(sha, size), f"page {sha[:12]}")
        for entry in entries:
            records.setdefault(entry.loop_idx, entry)
    open_loops: set[int] = set()
    offset = 0
    for page, size, *stored in loops["open"]:
        if stored:
            data = store.get(str(stored[0]), int(size))
            pages.open[int(page)] = PageRef(size=int(size), sha=str(stored[0]))
        else:  # in the step file
            data = bytes(inline[offset : offset + int(size)])
            offset += int(size)
            pages.open[int(page)] = PageRef([data])
        _, entries = parse_page(data, f"open page {page}")
        for entry in entries:
            records[entry.loop_idx] = entry
            open_loops.add(entry.loop_idx)
    if offset != len(inline):
        raise ValueError("inline sizes do not add up")
    for li, entry in records.items():
        if entry.stored is not None:
            entry.data = store.get(entry.stored, entry.size)
        for sha, size in entry.blobs:
            store.get(sha, size)
        pages.digests[li] = hashlib.blake2b(entry.data, digest_size=16).digest()
        if li in open_loops:
            pages.records[li] = (bytes(entry.data), tuple(entry.blobs))
            if entry.stored is not None:
                pages.stored[li] = entry.stored
    return records, pages


def _maps(names: Iterable[str], entries: dict[int, PageEntry], store: _Store) -> dict[str, Any]:
    maps: dict[str, LoopMap[Any]] = {name: LoopMap(_FACTORIES.get(name, dict)) for name in names}
    for li in sorted(entries):
        record = loads(entries[li].data, store.get)
        for name, value in record.items():
            if name in maps:
                maps[name]._values[li] = value
    for mapping in maps.values():
        mapping.take_touched()
    return maps


def read_snapshot(path: Path, key: bytes | None) -> Snapshot:
    """Read and check a step file (manifest, signature, checksum). Never unpickles."""
    with path.open("rb") as f:
        manifest = read_manifest(f, path, key)
        body = read_body(f, path, manifest)
    return Snapshot(path, manifest, body)


def assemble(path: str) -> Any:
    """What ``pickle.load`` of a step file calls: the loop object, as ``Cls.load`` reads it
    (checked the same way, with the signing key of the environment's ``LoopSettings``)."""
    from .._loop import LoopBase
    from .._settings import LoopSettings

    key = signing_key(LoopSettings().signing_key)
    return read_snapshot(Path(path), key).load(LoopBase)


def resolve_class(path: Path, name: str, expected: type) -> type[Any]:
    """The class a snapshot names, if it is ``expected`` or a subclass of it."""
    if qualified_name(expected) == name:
        return expected
    module_name, _, qualname = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SnapshotError(
            f"{path} holds a snapshot of {name}, but its module {module_name!r} cannot be "
            f"imported ({exc}); was it renamed or moved?"
        ) from exc
    obj: Any = module
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise SnapshotError(
            f"{path} holds a snapshot of {name}, but module {module_name!r} has no "
            f"{qualname!r}; was the class renamed?"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, expected)):
        raise SnapshotError(
            f"{path} holds a snapshot of {name}, not of {qualified_name(expected)} "
            f"or a subclass of it"
        )
    return obj


def order_of(path: Path) -> tuple[tuple[int, int], Manifest | None, str | None]:
    """When ``path`` was written (manifest time, or mtime if unreadable), its manifest, its
    problem."""
    try:
        with path.open("rb") as f:
            manifest = read_manifest(f, path, None)
        return manifest.order, manifest, None
    except (SnapshotError, OSError) as exc:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = 0
        return (mtime, 0), None, str(exc)


def newest_first(folder: Path) -> Iterable[list[Path]]:
    """Step files in groups, newest group first, by modification time; the newest group
    found without listing every loop folder.

    A loop folder's mtime is the time a file was last renamed into it (or removed), never
    earlier than its files' own: folders older than the newest file found cannot hold a
    newer one. Ties (the clock's resolution) are grouped: the caller orders them by their
    manifests.
    """
    try:
        loop_dirs = [e for e in os.scandir(folder) if e.name.isdigit() and e.is_dir()]
    except FileNotFoundError:
        return
    loop_dirs.sort(key=lambda e: e.stat().st_mtime_ns, reverse=True)
    best = -1
    found: list[tuple[int, Path]] = []
    for entry in loop_dirs:
        if entry.stat().st_mtime_ns < best:
            break
        for file in os.scandir(entry.path):
            if _is_step_name(file.name) and file.is_file():
                mtime = file.stat().st_mtime_ns
                found.append((mtime, Path(file.path)))
                best = max(best, mtime)
    if found:
        top = [p for m, p in found if m == best]
        yield top
    everything = sorted(
        ((p.stat().st_mtime_ns, p) for p in step_files(folder)), key=lambda t: t[0], reverse=True
    )
    groups: dict[int, list[Path]] = {}
    for mtime, path in everything:
        groups.setdefault(mtime, []).append(path)
    seen = {p for m, p in found if m == best}
    for group in groups.values():
        rest = [p for p in group if p not in seen]
        if rest:
            yield rest


def _is_step_name(name: str) -> bool:
    step, sep, _ = name.partition("_")
    return bool(sep) and step.isdigit()


def step_files(session_folder: Path) -> Iterable[Path]:
    """Every ``<loop>/<step>_<name>`` file of a session."""
    try:
        loop_dirs = list(os.scandir(session_folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in loop_dirs:
        if entry.name.isdigit() and entry.is_dir():
            for file in os.scandir(entry.path):
                if _is_step_name(file.name) and file.is_file():
                    yield Path(file.path)


def newest_valid(
    folder: Path,
    key: bytes | None,
    *,
    on_skip: Callable[[Path, Exception], object] | None = None,
) -> Verified:
    """The newest step file (by time of writing) that passes every check, read in full.

    Each newer broken one is reported with a ``SnapshotWarning`` naming it, or to
    ``on_skip`` (for readers that list the broken snapshots themselves).
    """
    skipped = 0
    for group in newest_first(folder):
        for path in sorted(group, key=lambda p: order_of(p)[0], reverse=True):
            try:
                return read_snapshot(path, key).verify()
            except OldFormatError:
                raise  # an older one is of the same format: say how to convert them
            except (SnapshotError, OSError) as exc:
                skipped += 1
                if on_skip is not None:
                    on_skip(path, exc)
                    continue
                warnings.warn(
                    f"skipping snapshot {path}: {exc}; trying an older one", SnapshotWarning, 4
                )
    if skipped:
        raise FileNotFoundError(
            f"no valid snapshot in session folder {folder}: all {skipped} are broken"
        )
    leftovers = [n for n in (STORE_NAME, TMP_NAME, ".journal") if (folder / n).is_dir()]
    why = " (a run was stopped before its first snapshot was complete)" if leftovers else ""
    journal = (
        "; the journal of the first loop's first step is kept: start the run again with "
        "a new loop object on the same trace_path, and what it memoized or was answered "
        "is not asked again"
        if (folder / ".journal").is_dir()
        else ""
    )
    raise FileNotFoundError(
        f"no snapshot in session folder {folder}: nothing was saved yet{why}, so there is "
        f"nothing to resume{journal}"
    )
