"""Taking a snapshot: a consistent picture now, the disk later.

``capture`` runs synchronously in ``dump()``, between steps: it pickles the state into
memory, one *segment* per attribute, with one pickler so that objects shared between
attributes stay shared. A ``SnapshotJob`` then does the slow part (cutting into chunks,
hashing, writing, fsyncing) where the run's snapshot writer has it done, or inline.

Thread steps may change ``self`` while it is pickled, which used to fail with "dictionary
changed size during iteration" (RD-Agent #1285). The pickler runs in C, but Python-level
``__reduce__``/``__getstate__`` code lets the interpreter switch threads every switch
interval (5 ms). A capture is first taken as it is; only if a mutation slipped in is it taken
again (``CAPTURE_ATTEMPTS`` times in all) with the switch interval raised to
``QUIET_INTERVAL``, so that other Python threads wait until it is done (typically
milliseconds). The switch interval is the process's, so it is touched only then, when a
thread is racing the capture, never at an ordinary snapshot. If the capture itself gives the
GIL away (a ``__reduce__`` that sleeps or does I/O), another thread may still run, for up to
``QUIET_INTERVAL`` each time.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import re
import sys
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._atomic import Durability, FileOp
from ._chunks import INLINE_MAX, SEGMENT_MIN, STORE_NAME, ChunkIndex
from ._format import clock, encode_header, json_string, qualified_name

if TYPE_CHECKING:
    from ._atomic import Fsync

PROTOCOL = 5
CAPTURE_ATTEMPTS = 3
QUIET_INTERVAL = 0.1  # seconds another thread may wait for the GIL during a capture

T = TypeVar("T")

capturing: ContextVar[bool] = ContextVar("rdagent_loop_capturing", default=False)
"""True while a snapshot is being pickled (objects may leave out what is saved elsewhere)."""

_MUTATED = re.compile(r"(changed|mutated)( size)? during iteration")


class _QuietThreads:
    """Raise ``sys.setswitchinterval`` while any capture runs (re-entrant, thread-safe).

    Entered only to take a capture again that another thread tore (see the module's
    docstring): it changes a setting of the whole process, the host application's threads
    included.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = sys.getswitchinterval()

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(max(QUIET_INTERVAL, self._saved))
            self._depth += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                sys.setswitchinterval(self._saved)


quiet_threads = _QuietThreads()


def without_tearing(make: Callable[[], T]) -> T:
    """Call ``make`` (which pickles live objects); if another thread changed a container
    meanwhile, call it again with other threads held off (see the module's docstring)."""
    try:
        return make()
    except RuntimeError as exc:
        if not _MUTATED.search(str(exc)):
            raise
    for attempt in range(2, CAPTURE_ATTEMPTS + 1):
        try:
            with quiet_threads:
                return make()
        except RuntimeError as exc:
            if attempt == CAPTURE_ATTEMPTS or not _MUTATED.search(str(exc)):
                raise
    raise AssertionError("unreachable")


def consistently(make: Callable[[], T]) -> T:
    """``without_tearing(make)``, with ``capturing`` set: ``make`` pickles a snapshot."""
    token = capturing.set(True)
    try:
        return without_tearing(make)
    finally:
        capturing.reset(token)


@dataclass(frozen=True, slots=True)
class Captured:
    """A pickled state: one buffer, cut into named segments.

    A segment is ``(name, start, end, own)``; ``own`` segments are pickles of their own
    (see ``pickle_state``), the others continue one pickler's memo.
    """

    buffer: memoryview
    segments: tuple[tuple[str, int, int, bool], ...]
    whole: bool  # the state is one object, not a dict of attributes
    largest: int = 0  # bytes in the largest segment


Constants = dict[str, tuple[Any, Any, bytes]]
"""Attribute name -> (object, its ``snapshot_version``, its pickle) of the last snapshot."""


def pickle_state(state: Any, constants: Constants | None = None) -> Captured:
    """Pickle ``state`` (usually ``obj.__getstate__()``) into segments, one per attribute.

    Attributes named in ``constants`` are self-contained values that change rarely (the
    settings, a path, the archive of finished loops): each is pickled on its own, and its
    bytes are reused while it is the same object with the same ``snapshot_version``. Every
    other attribute continues one pickler's memo, so objects shared between attributes stay
    shared.
    """
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=PROTOCOL)
    segments = []
    largest = 0
    if isinstance(state, dict) and all(isinstance(k, str) for k in state):
        for name, value in state.items():
            start = out.tell()
            own = constants is not None and name in constants
            if own:
                assert constants is not None
                cached = constants[name]
                version = getattr(value, "__dict__", {}).get("snapshot_version")
                if cached[0] is not value or cached[1] != version:
                    cached = constants[name] = (value, version, pickle.dumps(value, PROTOCOL))
                out.write(cached[2])
            else:
                pickler.dump(value)
            end = out.tell()
            segments.append((name, start, end, own))
            largest = max(largest, end - start)
        whole = False
    else:
        pickler.dump(state)
        largest = out.tell()
        segments.append(("", 0, largest, False))
        whole = True
    return Captured(out.getbuffer(), tuple(segments), whole, largest)


@dataclass(frozen=True, slots=True)
class OutputsBlob:
    """The pickled outputs and trace of one finished loop, written once beside its steps."""

    folder: Path  # the session folder
    loop_idx: int
    digest: str
    data: bytes
    written: Callable[[], None] = lambda: None


def outputs_path(folder: Path, loop_idx: int, digest: str) -> Path:
    """``<session>/<loop>/outputs-<sha256 prefix>``: no ``_``, so never taken for a step file."""
    return Path(_outputs_file(folder, loop_idx, digest))


def _outputs_file(folder: Path, loop_idx: int, digest: str) -> str:
    # a string: pathlib's joins would cost more than the rest of writing an outputs file
    return f"{os.fspath(folder)}{os.sep}{loop_idx}{os.sep}outputs-{digest[:16]}"


def store_for(path: str | Path) -> Path | None:
    """The chunk store of a snapshot at ``path``: its session's, if ``path`` follows RD-Agent's
    layout ``<session>/<loop>/<step>_<name>``; else None (the snapshot holds all its bytes)."""
    text = os.fspath(path)  # pathlib is slow here, and this runs at every snapshot
    if f"{os.sep}." in text or text.endswith(os.sep) or (os.altsep and os.altsep in text):
        text = os.path.normpath(text)  # "..", "." or a trailing slash: the slow way
    folder, _, name = text.rpartition(os.sep)
    step, sep, _ = name.partition("_")
    return _store_of(folder) if sep and step.isdigit() else None


@functools.lru_cache(maxsize=64)
def _store_of(loop_folder: str) -> Path | None:
    session, _, loop = loop_folder.rpartition(os.sep)
    return Path(session, STORE_NAME) if loop.isdigit() else None


@dataclass
class SnapshotJob:
    """Everything needed to write one snapshot (and the loop outputs it refers to)."""

    path: Path | None
    cls: str
    captured: Captured | None
    index: ChunkIndex | None
    durability: Durability
    key: bytes | None
    outputs: list[OutputsBlob] = field(default_factory=list)
    written_at: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        size = sum(len(blob.data) for blob in self.outputs)
        return size + (len(self.captured.buffer) if self.captured is not None else 0)

    @property
    def chunked(self) -> bool:
        """Whether building the files means cutting and hashing large segments (slow work,
        better done off the event loop's thread)."""
        captured = self.captured
        return self.index is not None and captured is not None and captured.largest >= SEGMENT_MIN

    def run(self, fsync: Fsync = os.fsync) -> None:
        """Write the outputs files, the new chunks, then the snapshot file itself, here."""
        for op in self.operations():
            op.apply(fsync)

    def operations(self, done: Callable[[], None] | None = None) -> list[FileOp]:
        """The files to write, in order: outputs, new chunks, the snapshot file last (with
        ``done`` as its ``done``). New chunks count as stored from now on."""
        ops = [outputs_operation(blob, self.durability, self.key) for blob in self.outputs]
        if self.path is None or self.captured is None:
            return ops
        if self.chunked:  # changes the index: built by the writer thread (or inline)
            assert self.index is not None
            with self.index.lock:
                manifest, inline = self._body(self.index, ops)
        else:  # only names the index: no lock, which the event loop would wait for
            manifest, inline = self._body(self.index, ops)
        digest = hashlib.sha256(manifest)
        for part in inline:
            digest.update(part)
        size = len(manifest) + sum(map(len, inline))
        header = encode_header(
            "snapshot", self.cls, size, digest.hexdigest(), self.key, self.written_at
        )
        data = b"".join([header, manifest, *inline])
        ops.append(FileOp(os.fspath(self.path), data, self.durability, make_dir=True, done=done))
        return ops

    def _body(self, index: ChunkIndex | None, ops: list[FileOp]) -> tuple[bytes, list[memoryview]]:
        """The manifest line and the inline bytes; new chunks are added to ``ops``."""
        captured = self.captured
        assert captured is not None
        assert self.path is not None
        segments: list[str] = []  # JSON, written by hand: this runs for every snapshot
        inline: list[memoryview] = []
        buffer = captured.buffer
        all_inline = True
        new = 0  # chunks written by this snapshot
        for name, start, end, own in captured.segments:
            flag = ",1" if own else ""
            if index is None or end - start < SEGMENT_MIN:
                segments.append(f"[{json_string(name)},[[{end - start}]]{flag}]")
                if not all_inline:
                    inline.append(buffer[start:end])
                continue
            if all_inline:  # the segments before this one, in one piece
                inline.append(buffer[:start])
                all_inline = False
            pieces: list[str] = []
            split, unchanged = index.split(name, memoryview(unframe(buffer[start:end])))
            last = len(split) - 1
            for n, ((size, digest), view) in enumerate(split):
                if digest not in index.known:
                    if size < INLINE_MAX or (n >= last - 1 and n >= unchanged):
                        # small, or a new end of the segment (the part most likely to change
                        # again): kept in this file; stored once it shows up unchanged
                        inline.append(view)
                        pieces.append(f"[{size}]")
                        continue
                    if index.claim(digest, view):  # else found whole in the store
                        new += 1
                        chunk = os.path.join(index.store, digest)
                        ops.append(
                            FileOp(chunk, view, self.durability, sync_dir=False, make_dir=True)
                        )
                pieces.append(f'[{size},"{digest}"]')
            segments.append(f"[{json_string(name)},[{','.join(pieces)}]{flag}]")
        if all_inline:
            inline.append(buffer)
        if new and self.durability == "fsync" and index is not None:
            ops.append(FileOp(os.fspath(index.store), None, self.durability))
        store = "null" if index is None else f'"../{STORE_NAME}"'  # see store_for()
        state = "object" if captured.whole else "dict"
        line = (
            f'{{"protocol":{PROTOCOL},"state":"{state}","store":{store},'
            f'"segments":[{",".join(segments)}]}}\n'
        ).encode()
        return line, inline


def outputs_operation(blob: OutputsBlob, durability: Durability, key: bytes | None) -> FileOp:
    """Writing one finished loop's outputs file (then ``blob.written`` is called).

    Its name holds its hash, so a file already there under that name has the same bytes,
    or is damaged: replacing it atomically is right either way, and cheaper than reading
    it first (this runs for every finished loop).
    """
    path = _outputs_file(blob.folder, blob.loop_idx, blob.digest)
    head = encode_header("outputs", f"loop {blob.loop_idx}", len(blob.data), blob.digest, key)
    return FileOp(path, head + blob.data, durability, make_dir=True, done=blob.written)


def write_outputs(blob: OutputsBlob, durability: Durability, key: bytes | None = None) -> int:
    """Write one finished loop's outputs file here and now."""
    return outputs_operation(blob, durability, key).apply()


def make_job(
    obj: Any,
    path: Path,
    *,
    durability: Durability,
    key: bytes | None,
    index: ChunkIndex | None,
    outputs: list[OutputsBlob],
    constants: Constants | None = None,
) -> SnapshotJob:
    """Capture ``obj`` now; the returned job writes it to ``path`` when run."""
    captured = consistently(lambda: pickle_state(obj.__getstate__(), constants))
    return SnapshotJob(
        path=path,
        cls=qualified_name(type(obj)),
        captured=captured,
        index=index,
        durability=durability,
        key=key,
        outputs=outputs,
        written_at=clock.tick(),
    )


__all__ = (
    "Captured",
    "OutputsBlob",
    "SnapshotJob",
    "capturing",
    "consistently",
    "make_job",
    "outputs_path",
    "pickle_state",
    "store_for",
    "without_tearing",
    "write_outputs",
)


_FRAME = 0x95
_LONG_HEADERS = {ord("B"): 5, ord("X"): 5, 0x8E: 9, 0x8D: 9, 0x96: 9}  # large objects


def unframe(data: memoryview) -> memoryview | bytes:
    """The same protocol-5 pickle without its FRAME opcodes.

    Frames cut a pickle every 64 KiB, and a frame's header holds its length: appending to
    a list rewrites the header of the last frame, far from the end, so an unchanged prefix
    would not stay unchanged. Frames are optional for the unpickler. The C pickler writes a
    pickle as frames, with only large objects (a header and their data) between them; if
    anything else shows up, the rest is kept as it is (still a valid pickle).
    """
    if len(data) < 2 or data[0] != 0x80:
        return data
    parts = [data[:2]]
    pos = 2
    end = len(data)
    while pos < end:
        op = data[pos]
        if op == _FRAME:
            size = int.from_bytes(data[pos + 1 : pos + 9], "little")
            parts.append(data[pos + 9 : pos + 9 + size])
            pos += 9 + size
        elif op in _LONG_HEADERS:
            head = _LONG_HEADERS[op]
            size = head + int.from_bytes(data[pos + 1 : pos + head], "little")
            parts.append(data[pos : pos + size])
            pos += size
        else:
            parts.append(data[pos:])
            break
    return b"".join(parts)
