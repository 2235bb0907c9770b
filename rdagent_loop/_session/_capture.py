"""Taking a snapshot: a consistent picture now, the disk later.

``make_job`` runs synchronously in ``dump()``, between steps. It pickles, into memory,
each attribute of the loop on its own (a *segment*), and the records of the loops touched
since the last snapshot (``_pages.py``); large ``bytes`` values are put aside as blobs
(``_blobs.py``). What the session already holds is not written again: ``Saved`` remembers
it. A ``SnapshotJob`` then does the slow part (cutting large segments into chunks, hashing,
writing, fsyncing) where the run's snapshot writer has it done, or inline.

Each attribute is pickled on its own so that an unchanged one gives the same bytes (and
chunks) every time: two attributes that refer to one object get a copy each after ``load``.

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

import hashlib
import os
import pickle
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .._loops import PER_LOOP, LoopMap
from ._atomic import Durability, FileOp
from ._blobs import BLOB_MIN, Blobs, dumps
from ._chunks import SEGMENT_MIN, STORE_NAME, ChunkIndex
from ._format import ENGINE_VERSION, FORMAT_VERSION, clock, encode_tail, qualified_name
from ._pages import LoopPages, PageRef, PagesPicture

PROTOCOL = 5
CAPTURE_ATTEMPTS = 3
QUIET_INTERVAL = 0.1  # seconds another thread may wait for the GIL during a capture

T = TypeVar("T")

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


@dataclass
class Saved:
    """What this process knows its session holds, so that a snapshot writes only what
    changed. Kept beside the loop object (never in a snapshot); ``load`` seeds it."""

    session: str
    index: ChunkIndex
    pages: LoopPages = field(default_factory=LoopPages)
    blobs: Blobs = field(default_factory=Blobs)
    valid: bool = True
    """False once a write failed: what it claims to be stored may not be."""
    last: dict[str, Segment] = field(default_factory=dict)
    """Each attribute's segment in the last snapshot."""
    small: set[str] = field(default_factory=set)
    """Attributes whose pickle was small last time (see ``_blobs.dumps``)."""
    store: str = ""
    tmp: str = ""

    def __post_init__(self) -> None:
        self.store = os.path.join(self.session, STORE_NAME)
        self.tmp = os.path.join(self.session, TMP_NAME)


TMP_NAME = ".tmp"
OPEN_INLINE_MAX = 32 * 1024


def session_for(path: str | Path) -> str | None:
    """The session folder of a step file at ``path``, if it follows RD-Agent's layout
    ``<session>/<loop>/<step>_<name>``; else None (the file then holds all its bytes)."""
    text = os.fspath(path)  # pathlib is slow here, and this runs at every snapshot
    if f"{os.sep}." in text or text.endswith(os.sep) or (os.altsep and os.altsep in text):
        text = os.path.normpath(text)  # "..", "." or a trailing slash: the slow way
    folder, _, name = text.rpartition(os.sep)
    step, sep, _ = name.partition("_")
    session, _, loop = folder.rpartition(os.sep)
    return session if sep and step.isdigit() and loop.isdigit() and session else None


def saved_of(obj: Any, session: str) -> Saved:
    """``obj``'s record of what ``session`` holds; a fresh one (every loop touched) if it
    has none for this session, or a write failed since."""
    saved = obj.__dict__.get("_saved")
    if isinstance(saved, Saved) and saved.session == session and saved.valid:
        return saved
    saved = Saved(session, ChunkIndex(Path(session, STORE_NAME)))
    obj.__dict__["_saved"] = saved
    for name in PER_LOOP:
        mapping = obj.__dict__.get(name)
        if isinstance(mapping, LoopMap):
            mapping.touched.update(mapping)
    return saved


Segment = tuple[str, bytes, dict[str, bytes]]
"""(attribute name, its pickle, the blobs it refers to)."""


@dataclass
class SnapshotJob:
    """Everything needed to write one step file and what it points at."""

    path: str
    cls: str
    steps: list[str]
    durability: Durability
    key: bytes | None
    stub: bytes
    segments: list[Segment]
    whole: bool
    saved: Saved | None = None
    pages: list[PageRef] = field(default_factory=list)
    loops: PagesPicture | None = None
    per_loop: list[str] = field(default_factory=list)
    record_blobs: dict[str, bytes] = field(default_factory=dict)
    written_at: tuple[int, int] = (0, 0)
    session_version: int = 0
    """The class's ``session_version``, recorded with its ``steps`` (see ``_placement``)."""

    @property
    def nbytes(self) -> int:
        size = sum(len(data) + sum(map(len, blobs.values())) for _, data, blobs in self.segments)
        return size + sum(p.size for p in self.pages) + sum(map(len, self.record_blobs.values()))

    @property
    def chunked(self) -> bool:
        """Whether building the files means cutting and hashing large segments (slow work,
        better done off the event loop's thread)."""
        return self.saved is not None and any(len(d) >= SEGMENT_MIN for _, d, _ in self.segments)

    def run(self, fsync: Callable[[int], None] = os.fsync) -> None:
        """Write everything here and now."""
        for op in self.operations():
            op.apply(fsync)

    def failed(self) -> None:
        """A write of this job failed: the store may lack what ``saved`` says it holds."""
        if self.saved is not None:
            self.saved.valid = False

    def operations(self, done: Callable[[], None] | None = None) -> list[FileOp]:
        """The files to write, in order: blobs, chunks and pages, then the step file (its
        ``done`` is ``done``). What they store counts as stored from now on."""
        ops: list[FileOp] = []
        saved = self.saved
        inline: list[bytes | memoryview] = [self.stub]
        attrs = []
        for name, data, blobs in self.segments:
            refs = [[sha, len(b)] for sha, b in blobs.items()]
            if saved is None or len(data) < SEGMENT_MIN:
                inline.append(data)
                attrs.append([name, [[len(data)]], refs])
                continue
            pieces = []
            split, _ = saved.index.split(name, memoryview(unframe(memoryview(data))))
            for (size, sha), view in split:
                self._store(ops, sha, view)
                pieces.append([size, sha])
            attrs.append([name, pieces, refs])
        if saved is not None:
            for _, _, blobs in self.segments:
                for sha, blob in blobs.items():
                    self._store(ops, sha, blob)
            for sha, blob in self.record_blobs.items():
                self._store(ops, sha, blob)
            for page in self.pages:  # sealed: always in the store
                self._store(ops, page.sha, page.parts)
            if self.loops is not None:
                inline += self._open_pages(ops, self.loops)
            if ops and self.durability == "fsync":  # their names, before the step file
                ops.append(FileOp(saved.store, None, self.durability))
        body = b"".join(inline)
        fields = {
            "format": FORMAT_VERSION,
            "engine": ENGINE_VERSION,
            "cls": self.cls,
            "steps": self.steps,
            "session_version": self.session_version,
            "written_at_ns": self.written_at[0],
            "seq": self.written_at[1],
            "stub_size": len(self.stub),
            "body_size": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "state": "object" if self.whole else "dict",
            "attrs": attrs,
            "per_loop": self.per_loop,
            "loops": None if self.loops is None else self.loops.manifest(),
        }
        data = body + encode_tail(fields, self.key)
        tmp = None if saved is None else saved.tmp
        ops.append(FileOp(self.path, data, self.durability, make_dir=True, tmp_dir=tmp, done=done))
        return ops

    def _open_pages(self, ops: list[FileOp], loops: PagesPicture) -> list[bytes]:
        """The open pages: kept in the step file while they are small, else stored and
        named (1,000 loops in flight make 63 pages). A tiny step then writes one file, not
        two: no-op steps/s went from 1,913 to 2,228 flushed and from 1,309 to 1,783
        fsynced (medians of 5, the ``benchmarks`` snapshots loop)."""
        if sum(ref.size for ref in loops.open.values()) <= OPEN_INLINE_MAX:
            loops.inline = True
            return [part for page in sorted(loops.open) for part in loops.open[page].parts]
        for ref in loops.open.values():
            self._store(ops, ref.sha, ref.parts)
        return []

    def _store(self, ops: list[FileOp], sha: str, data: bytes | memoryview | list[bytes]) -> None:
        saved = self.saved
        assert saved is not None
        if not saved.index.claim(sha):
            return
        path = f"{saved.store}{os.sep}{sha}"  # not os.path.join: this runs for every file
        ops.append(
            FileOp(
                path,
                data,
                self.durability,
                sync_dir=False,
                make_dir=True,
                tmp_dir=saved.tmp,
                if_absent=True,
            )
        )


def _segment(saved: Saved, name: str, value: Any) -> Segment:
    """``value`` pickled, with its blobs put aside. An attribute seen for the first time is
    taken as large: a 500 MB one pickled whole only to find it large would double the
    memory it takes."""
    segment = (name, *dumps(value, saved.blobs, large=name not in saved.small))
    if len(segment[1]) >= BLOB_MIN or segment[2]:
        saved.small.discard(name)
    else:
        saved.small.add(name)
    last = saved.last.get(name)
    if last is not None and last[1] == segment[1]:
        # the same bytes as last time: keep one copy, so that jobs queued behind a busy
        # disk do not each hold their own (1,000 loops in flight: 5.6 of 20.7 MB)
        return last
    saved.last[name] = segment
    return segment


class _Stub:
    """Pickles as a call of ``assemble(path)``: what a plain ``pickle.load`` runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        from ._reader import assemble

        return (assemble, (self.path,))


def make_job(
    obj: Any, path: str | Path, *, durability: Durability, key: bytes | None
) -> SnapshotJob:
    """Capture ``obj`` now; the returned job writes it to ``path`` when run."""
    target = os.fspath(path)
    if not os.path.isabs(target):  # the engine's paths are absolute already (no getcwd)
        target = os.path.abspath(target)
    session = session_for(target)
    state = obj.__getstate__()
    whole = not (isinstance(state, dict) and all(isinstance(k, str) for k in state))
    saved = None if session is None else saved_of(obj, session)
    job = SnapshotJob(
        path=target,
        cls=qualified_name(type(obj)),
        steps=list(getattr(type(obj), "steps", ())),
        session_version=int(getattr(type(obj), "session_version", 0)),
        durability=durability,
        key=key,
        stub=pickle.dumps(_Stub(target), protocol=PROTOCOL),
        segments=[],
        whole=whole,
        saved=saved,
    )
    if saved is None:  # all in the file: plain pickles
        items = [("", state)] if whole else list(state.items())
        job.segments = without_tearing(
            lambda: [(name, pickle.dumps(value, PROTOCOL), {}) for name, value in items]
        )
    else:
        maps: dict[str, LoopMap[Any]] = {}
        if not whole:
            state = dict(state)
            for name in PER_LOOP:
                if isinstance(state.get(name), LoopMap):
                    maps[name] = state.pop(name)
        items = [("", state)] if whole else list(state.items())
        touched: set[int] = set()
        for mapping in maps.values():
            touched |= mapping.take_touched()
        try:
            job.segments, records = without_tearing(
                lambda: (
                    [_segment(saved, name, value) for name, value in items],
                    saved.pages.pickle_records(maps, touched, saved.blobs),
                )
            )
        except BaseException:
            for mapping in maps.values():  # not saved: still to be saved next time
                mapping.touched |= touched
            raise
        steps = maps.get("step_idx")
        n = len(job.steps)
        finished = (lambda li: steps.peek(li, 0) >= n) if steps is not None else (lambda li: False)
        job.pages = saved.pages.commit(records, finished, int(getattr(obj, "loop_idx", 0)))
        job.record_blobs = saved.pages.take_new_blobs()
        job.loops = saved.pages.picture() if maps else None
        job.per_loop = sorted(maps)
        saved.blobs.forget_unseen()
    job.written_at = clock.tick()
    return job


__all__ = (
    "TMP_NAME",
    "Saved",
    "SnapshotJob",
    "make_job",
    "saved_of",
    "session_for",
    "without_tearing",
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
