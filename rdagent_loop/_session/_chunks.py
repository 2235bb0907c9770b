"""Content-defined chunks: the unchanged parts of a state are stored once per session.

A snapshot's state is a few pickled *segments* (one per attribute of the loop object). Each
segment is cut into chunks where its content says so, not at fixed offsets: a cut falls
after every place where a hash of the last few bytes hits a fixed value (about once in 64
KiB), within [MIN_CHUNK, MAX_CHUNK] of the previous cut. Bytes inserted or appended then
change only the chunks around them, and the chunks before and after them are the same
files as in the previous snapshot. Chunks live in ``<session>/.chunks/<sha256>``, are
written once, atomically, and are checked against their name whenever they are read.

The rolling hash is computed for a whole block at a time with C-speed operations
(``bytes.translate`` and big-integer XOR), because a byte-by-byte loop in Python would cost
more than the disk writes it saves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from .._errors import SnapshotError

MIN_CHUNK = 16 * 1024
MAX_CHUNK = 256 * 1024
INLINE_MAX = 4 * 1024
"""Pieces smaller than this are kept inside the snapshot file instead of the chunk store."""
SEGMENT_MIN = 64 * 1024
"""Segments smaller than this are kept whole inside the snapshot file: cutting and hashing
them at every snapshot costs more than writing them again."""

STORE_NAME = ".chunks"
TAIL = 64
"""The end of a segment, kept apart from the piece before it."""

_WINDOW = 4
_TABLES = tuple(
    hashlib.shake_256(b"rdagent_loop chunk table %d" % k).digest(256) for k in range(_WINDOW)
)
_NEEDLE = b"\x5a\xc3"  # two consecutive hash bytes: a cut about every 64 KiB of varied data
_BLOCK = 64 * 1024

Piece = tuple[int, str]
"""(size, sha256 hex) of one piece of a segment."""


def _mixed(data: memoryview, lo: int, hi: int) -> bytes:
    """``M[q] = T0[d[q]] ^ T1[d[q-1]] ^ ... `` for ``q`` in ``[lo, hi)``: a hash of a window."""
    acc = 0
    for k, table in enumerate(_TABLES):
        acc ^= int.from_bytes(data[lo - k : hi - k].tobytes().translate(table), "little")
    return acc.to_bytes(hi - lo, "little")


def _find_cut(data: memoryview, lo: int, hi: int) -> int:
    """The first content-defined cut in ``[lo, hi]``, else ``hi``.

    A cut comes right after ``p`` when ``M[p-1], M[p]`` equal the needle.
    """
    begin = lo - 1
    while begin < hi:
        end = min(begin + _BLOCK, hi)
        found = _mixed(data, begin - 1, end).find(_NEEDLE)
        if found >= 0:
            return begin + found + 1
        begin = end
    return hi


def cut_points(data: memoryview, start: int = 0) -> list[int]:
    """The ends of the chunks of ``data[start:]`` (the last one is ``len(data)``)."""
    size = len(data)
    ends = []
    pos = start
    while pos < size:
        if size - pos <= MIN_CHUNK:
            ends.append(size)
            break
        pos = _find_cut(data, pos + MIN_CHUNK, min(pos + MAX_CHUNK, size))
        ends.append(pos)
    return ends


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkIndex:
    """What this process knows about one store, to write each of its files once.

    ``known`` are files (chunks, blobs, pages) a verified snapshot reads or this process has
    handed to the writer (``Saved.valid`` says when a failed write voids that); ``segments``
    remembers how each
    segment was cut last time, so an unchanged prefix is recognised by hashing it (no second
    copy of the state is kept) and only what follows it is cut again.
    """

    def __init__(self, store: Path) -> None:
        self.store = store
        self.known: set[str] = set()
        self.segments: dict[str, list[Piece]] = {}

    def split(self, name: str, data: memoryview) -> tuple[list[tuple[Piece, memoryview]], int]:
        """Cut segment ``name`` into pieces, reusing the cuts of its last version.

        Also return how many leading pieces are unchanged since that version. The last
        ``TAIL`` bytes are a piece of their own (see below).
        """
        pieces: list[tuple[Piece, memoryview]] = []
        pos = 0
        for size, digest in self.segments.get(name, ()):
            end = pos + size
            if end > len(data) or sha256(data[pos:end]) != digest:
                break
            pieces.append(((size, digest), data[pos:end]))
            pos = end
        unchanged = len(pieces)
        if pos < len(data) or not pieces:
            ends = cut_points(data, pos)
            if ends and ends[-1] - (ends[-2] if len(ends) > 1 else pos) > 2 * TAIL:
                # a pickle ends with the opcodes that close its containers: appending to a
                # list changes only those. Keep them apart, so the bytes before them come
                # back unchanged in the next version and need not be stored again.
                ends.insert(-1, ends[-1] - TAIL)
            for end in ends:
                view = data[pos:end]
                pieces.append(((end - pos, sha256(view)), view))
                pos = end
        self.segments[name] = [piece for piece, _ in pieces]
        return pieces, unchanged

    def claim(self, digest: str) -> bool:
        """True if the store file ``digest`` must be written now; it then counts as known,
        so the caller must write it before anything that refers to it (its writes keep
        order). A file already there is left as it is by the write (``if_absent``)."""
        if digest in self.known:
            return False
        self.known.add(digest)
        return True

    def seed(self, segments: Iterable[tuple[str, list[Piece]]], stored: Iterable[str]) -> None:
        """Start from a snapshot that was just read and verified."""
        for name, pieces in segments:
            self.segments[name] = pieces
        self.known.update(stored)


def read_chunk(store: Path, digest: str, size: int) -> bytes:
    """Chunk ``digest`` of ``store``, checked against its size and hash."""
    path = store / digest
    try:
        with path.open("rb") as f:
            data = f.read(size + 1)
    except FileNotFoundError:
        raise SnapshotError(f"chunk {path} is missing") from None
    if len(data) != size or sha256(data) != digest:
        raise SnapshotError(f"chunk {path} is damaged: it does not match its hash")
    return data
