"""Reading a snapshot back: verify all of it, then (and only then) unpickle.

Order of checks: magic and header (format, signature), the body's size and checksum, every
chunk's hash, the loop class (imported by name only now), and last the unpickling itself,
whose import errors become a ``SnapshotError`` naming the snapshot, the class and what is
missing.
"""

from __future__ import annotations

import copyreg
import importlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import SnapshotError, SnapshotWarning
from ._chunks import Piece, read_chunk, sha256
from ._format import Header, qualified_name, read_body, read_header

StoredPiece = tuple[int, str | None]
"""(size, sha256 of a stored chunk), or (size, None) for bytes inside the snapshot file."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot file whose header and body passed their checks (chunks not read yet)."""

    path: Path
    header: Header
    whole: bool
    store: Path | None
    segments: tuple[tuple[str, tuple[StoredPiece, ...]], ...]
    own: frozenset[str]  # segments pickled on their own (not in the shared memo)
    inline: memoryview

    @property
    def state_size(self) -> int:
        """Bytes of pickled state, wherever they are stored."""
        return sum(size for _, pieces in self.segments for size, _ in pieces)

    def _stored(self) -> Iterator[tuple[int, str]]:
        for _, pieces in self.segments:
            for size, digest in pieces:
                if digest is not None:
                    yield size, digest

    def check_chunks(self, deep: bool = False) -> None:
        """Check that every chunk is there with its size (``deep``: and its hash)."""
        seen: set[str] = set()
        for size, digest in self._stored():
            if digest in seen:
                continue
            seen.add(digest)
            assert self.store is not None
            if deep:
                read_chunk(self.store, digest, size)
                continue
            try:
                actual = (self.store / digest).stat().st_size
            except FileNotFoundError:
                raise SnapshotError(f"chunk {self.store / digest} is missing") from None
            if actual != size:
                raise SnapshotError(f"chunk {self.store / digest} has the wrong size")

    def read_pieces(self) -> list[list[bytes | memoryview]]:
        """The bytes of every segment, each stored chunk checked against its hash."""
        cache: dict[str, bytes] = {}
        offset = 0
        segments = []
        for _, pieces in self.segments:
            parts: list[bytes | memoryview] = []
            for size, digest in pieces:
                if digest is None:
                    parts.append(self.inline[offset : offset + size])
                    offset += size
                else:
                    if digest not in cache:
                        assert self.store is not None
                        try:
                            cache[digest] = read_chunk(self.store, digest, size)
                        except SnapshotError as exc:
                            raise SnapshotError(f"{self.path}: {exc}") from None
                    parts.append(cache[digest])
            segments.append(parts)
        return segments

    def rebuild(self, expected: type, pieces: list[list[bytes | memoryview]]) -> Any:
        """The loop object, an instance of ``expected`` or of a subclass of it."""
        cls = resolve_class(self.path, self.header.cls, expected)
        shared = [
            parts
            for (name, _), parts in zip(self.segments, pieces, strict=True)
            if name not in self.own
        ]
        unpickler = _unpickler(p for parts in shared for p in parts)
        state: Any
        name = ""
        try:
            if self.whole:
                state = unpickler.load()
            else:
                state = {}
                for (name, _), parts in zip(self.segments, pieces, strict=True):
                    if name in self.own:
                        state[name] = _unpickler(parts).load()
                    else:
                        state[name] = unpickler.load()
        except (ImportError, AttributeError) as exc:
            where = f"attribute {name!r}" if name else "the state"
            raise SnapshotError(
                f"{self.path} holds a snapshot of {self.header.cls}, but {where} cannot be "
                f"rebuilt: {exc} (was a module or class it uses renamed or moved?)"
            ) from exc
        obj: Any = copyreg.__newobj__(cls)  # type: ignore[attr-defined]  # what pickle does
        setstate = getattr(obj, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            obj.__dict__.update(state)
        return obj

    def index_seed(self) -> tuple[list[tuple[str, list[Piece]]], list[str]]:
        """How this snapshot cut its segments, and the chunks it proved are in the store."""
        offset = 0
        segments = []
        stored = []
        for name, pieces in self.segments:
            cut: list[Piece] = []
            for size, digest in pieces:
                if digest is None:
                    digest = sha256(self.inline[offset : offset + size])
                    offset += size
                else:
                    stored.append(digest)
                cut.append((size, digest))
            segments.append((name, cut))
        return segments, stored


def _unpickler(pieces: Iterable[bytes | memoryview]) -> pickle.Unpickler:
    return pickle.Unpickler(io.BufferedReader(_Pieces(pieces), 1 << 16))


class _Pieces(io.RawIOBase):
    """A read-only stream over a sequence of byte strings, without joining them."""

    def __init__(self, pieces: Iterable[bytes | memoryview]) -> None:
        self._pieces = iter(pieces)
        self._current = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._current:
            nxt = next(self._pieces, None)
            if nxt is None:
                return 0
            self._current = memoryview(nxt)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def read_snapshot(path: Path, key: bytes | None) -> Snapshot:
    """Read and check a snapshot file (header, signature, body). Never unpickles."""
    with path.open("rb") as f:
        header = read_header(f, path, key)
        if header.kind != "snapshot":
            raise SnapshotError(f"{path} is an {header.kind} file, not a snapshot")
        body = read_body(f, path, header)
    end = body.find(b"\n")
    try:
        manifest = json.loads(body[:end])
        raw_segments = manifest["segments"]
        segments = tuple((str(s[0]), tuple(_piece(p) for p in s[1])) for s in raw_segments)
        own = frozenset(str(s[0]) for s in raw_segments if len(s) > 2 and s[2])
        whole = manifest["state"] == "object"
        store = manifest["store"]
        if manifest["protocol"] > pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"pickle protocol {manifest['protocol']} is too new")
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{path} has a corrupt manifest: {exc!r}") from None
    inline = memoryview(body)[end + 1 :]
    if sum(size for _, pieces in segments for size, d in pieces if d is None) != len(inline):
        raise SnapshotError(f"{path} has a corrupt manifest: inline sizes do not add up")
    stores_chunks = any(d is not None for _, pieces in segments for _, d in pieces)
    if stores_chunks and not isinstance(store, str):
        raise SnapshotError(f"{path} has a corrupt manifest: chunks but no store")
    return Snapshot(
        path=path,
        header=header,
        whole=whole,
        store=Path(os.path.normpath(path.parent / store)) if isinstance(store, str) else None,
        segments=segments,
        own=own,
        inline=inline,
    )


def _piece(raw: Any) -> StoredPiece:
    size = int(raw[0])
    digest = raw[1] if len(raw) > 1 else None
    if size < 0 or (digest is not None and (len(digest) != 64 or not _is_hex(digest))):
        raise ValueError(f"bad piece {raw!r}")
    return size, digest


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


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


def order_of(path: Path) -> tuple[tuple[int, int], Header | None, str | None]:
    """When ``path`` was written (header time, or mtime if unreadable), its header, its problem."""
    try:
        with path.open("rb") as f:
            header = read_header(f, path, None)
        return header.order, header, None
    except (SnapshotError, OSError) as exc:
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            mtime = 0
        return (mtime, 0), None, str(exc)


def newest_valid(
    files: Iterable[Path],
    folder: Path,
    key: bytes | None,
    *,
    on_skip: Callable[[Path, Exception], object] | None = None,
) -> tuple[Snapshot, list[list[bytes | memoryview]]]:
    """The newest snapshot (by time of writing) that passes every check, read in full.

    Each newer broken one is reported with a ``SnapshotWarning`` naming it, or to
    ``on_skip`` (for readers that list the broken snapshots themselves).
    """
    ordered = sorted(files, key=lambda p: order_of(p)[0], reverse=True)
    skipped = 0
    for path in ordered:
        try:
            snapshot = read_snapshot(path, key)
            pieces = snapshot.read_pieces()
        except (SnapshotError, OSError) as exc:
            skipped += 1
            if on_skip is not None:
                on_skip(path, exc)
                continue
            warnings.warn(
                f"skipping snapshot {path}: {exc}; trying an older one", SnapshotWarning, 4
            )
            continue
        return snapshot, pieces
    detail = f" ({skipped} broken)" if skipped else ""
    raise FileNotFoundError(f"no valid snapshot in session folder {folder}{detail}")
