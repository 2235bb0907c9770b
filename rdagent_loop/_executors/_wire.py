"""The protocol between the process pool and its workers: pipes, plus shared memory.

A frame is an 8-byte big-endian length and that many bytes. The parent sends a preparation
frame (a pickle) once per worker, then one task frame per step, a pickle of ``(bound
method, prev_out)``: after the tag ``P`` in the frame itself, or, when it is large and the
platform has ``memfd_create``, after the tag ``S`` as its size in the worker's shared
memory region. Shared memory spares the copies through the pipe (a 10 MB loop object costs
one memory copy instead of four). The worker answers each task with one reply frame:
``(OK, output)``, ``(ERROR, exception, traceback text)``, or, for an exception that does
not survive pickling, ``(ERROR_TEXT, type name, message, traceback text)``. Before its reply,
a step may send requests to the step journal (``memo_blocking``, ``ask_blocking``): a frame
``Q`` + a pickle of the request, each answered by a frame holding a pickle of ``(True,
result)`` or ``(False, exception)``.

The parent's ends are non-blocking and driven by the event loop (``FrameReader`` reads into
a preallocated buffer); the worker's ends are blocking.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import traceback
from typing import Any

from .._errors import RemoteStepError
from .._journal import RequestPort

HEADER = struct.Struct("!Q")
OK, ERROR, ERROR_TEXT = "ok", "error", "error-text"
PROTOCOL = pickle.HIGHEST_PROTOCOL
IN_FRAME, SHARED = b"P", b"S"
REQUEST = b"Q"  # a frame a worker sends in the middle of a step: a call to the step journal
SHARED_TASK = struct.Struct("!QQ")  # pickle size, region size
SHARED_MIN = 256 * 1024  # smaller tasks travel in the frame


class Chunks:
    """A pickle sink that keeps large ``bytes`` objects by reference instead of copying.

    The C pickler hands objects of 64 KiB and more to ``write`` as they are; immutable ones
    are kept, mutable ones (``bytearray``, views) copied, so the pickle stays a consistent
    picture of the moment it was made.
    """

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: Any) -> int:
        part = data if type(data) is bytes else bytes(data)
        self.parts.append(part)
        self.size += len(part)
        return len(part)


def pickle_chunks(obj: Any) -> Chunks:
    chunks = Chunks()
    pickle.Pickler(chunks, protocol=PROTOCOL).dump(obj)
    return chunks


class SharedRegion:
    """A memory region both sides map from one ``memfd``; the parent grows it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self._map: mmap.mmap | None = None

    def map(self, size: int) -> memoryview:
        """The first ``size`` bytes, mapped (again) if the region has grown to ``size``."""
        if self._map is None or self.size != size:
            self.close_map()
            self._map = mmap.mmap(self.fd, size)
            self.size = size
        return memoryview(self._map)

    def grow(self, needed: int) -> None:
        """Parent only: make the region at least ``needed`` bytes (powers of two)."""
        if needed > self.size:
            size = max(1 << 20, 1 << (needed - 1).bit_length())
            os.ftruncate(self.fd, size)
            self.map(size)

    def store(self, chunks: Chunks) -> None:
        self.grow(chunks.size)
        view = self.map(self.size)
        pos = 0
        for part in chunks.parts:
            view[pos : pos + len(part)] = part
            pos += len(part)
        view.release()

    def close_map(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        self.close_map()
        os.close(self.fd)


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception raised in a worker: its traceback there."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\n(in the worker process)\n{self.tb}"


# -- the worker's side (blocking) ---------------------------------------------------------


def read_exact(fd: int, size: int) -> bytearray | None:
    """Read ``size`` bytes, or return ``None`` at end of file."""
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    while pos < size:
        n = os.readv(fd, [view[pos:]])
        if n == 0:
            return None
        pos += n
    return buf


def read_frame(fd: int) -> bytearray | None:
    header = read_exact(fd, HEADER.size)
    if header is None:
        return None
    return read_exact(fd, HEADER.unpack(header)[0])


def load_task(frame: bytearray, region: SharedRegion | None) -> Any:
    """Unpickle a task frame, from the frame itself or from the shared region."""
    tag, body = frame[:1], memoryview(frame)[1:]
    if tag == IN_FRAME:
        return pickle.loads(body)
    assert region is not None, "a shared-memory task, but no shared region"
    size, region_size = SHARED_TASK.unpack(body)
    view = region.map(region_size)
    try:
        return pickle.loads(view[:size])
    finally:
        view.release()


def write_frame(fd: int, payload: bytes) -> None:
    for chunk in (HEADER.pack(len(payload)), payload):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


def encode_output(output: Any) -> bytes:
    try:
        return pickle.dumps((OK, output), protocol=PROTOCOL)
    except Exception as exc:
        error = TypeError(f"the step returned a value that cannot be pickled: {exc!r}")
        return encode_error(error, traceback.format_exc())


def encode_error(exc: BaseException, tb: str) -> bytes:
    """The exception itself if it survives a round trip through pickle, else its text."""
    try:
        data = pickle.dumps((ERROR, exc, tb), protocol=PROTOCOL)
        pickle.loads(data)
        return data
    except Exception:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return pickle.dumps((ERROR_TEXT, name, str(exc), tb), protocol=PROTOCOL)


class PipePort(RequestPort):
    """The step journal, as a step in a worker process reaches it: through the engine."""

    def __init__(self, from_parent: int, to_parent: int) -> None:
        self._in = from_parent
        self._out = to_parent

    def _call(self, *request: Any) -> Any:
        write_frame(self._out, REQUEST + pickle.dumps(request, protocol=PROTOCOL))
        frame = read_frame(self._in)
        if frame is None:  # the pool is gone: so is the run
            raise EOFError("the engine closed the pipe to this worker")
        ok, value = pickle.loads(frame)
        if not ok:
            raise value
        return value


# -- the parent's side (non-blocking) -----------------------------------------------------


class FrameReader:
    """Reassembles frames from a non-blocking fd, reading straight into their buffers."""

    def __init__(self) -> None:
        self._buf = bytearray(HEADER.size)
        self._pos = 0
        self._in_header = True
        self.frames: list[bytearray] = []

    def pump(self, fd: int) -> bool:
        """Read all that is available now; return False at end of file."""
        while True:
            if self._pos == len(self._buf):
                self._advance()
                continue
            try:
                n = os.readv(fd, [memoryview(self._buf)[self._pos :]])
            except BlockingIOError:
                return True
            if n == 0:
                return False
            self._pos += n

    def _advance(self) -> None:
        if self._in_header:
            self._buf = bytearray(HEADER.unpack(self._buf)[0])
            self._in_header = False
        else:
            self.frames.append(self._buf)
            self._buf = bytearray(HEADER.size)
            self._in_header = True
        self._pos = 0


def decode_reply(reply: bytes | bytearray) -> Any:
    """Return the step's output, or raise its exception as itself."""
    kind, *rest = pickle.loads(reply)
    if kind == OK:
        return rest[0]
    if kind == ERROR:
        exc, tb = rest
        exc.__cause__ = RemoteTraceback(tb)
        raise exc
    type_name, message, tb = rest
    raise RemoteStepError(type_name, message, tb)
