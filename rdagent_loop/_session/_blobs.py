"""Large ``bytes`` values, pickled by reference: stored once, shipped once.

A ``bytes`` object of ``BLOB_MIN`` bytes or more met while pickling a segment is written
to the store under its SHA-256 (``.chunks/<sha256>``) and pickled as a persistent id
``(sha256, size)``. ``bytes`` are immutable, so the same object always has the same hash:
``Blobs`` remembers it by identity, and an unchanged 500 MB attribute costs a dictionary
lookup at every snapshot instead of a copy and a hash. The process executor uses the same
pickler, so a worker receives each blob once (see ``_executors/_process.py``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable
from typing import Any

BLOB_MIN = 64 * 1024
PROTOCOL = 5

BlobRef = tuple[str, int]
"""(sha256 hex, size) of a blob."""


class Blobs:
    """The hashes of the large ``bytes`` objects pickled lately, by identity."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[bytes, str]] = {}
        self._seen: dict[int, tuple[bytes, str]] = {}

    def ref(self, obj: bytes) -> BlobRef:
        key = id(obj)
        entry = self._by_id.get(key) or self._seen.get(key)
        if entry is None or entry[0] is not obj:
            entry = (obj, hashlib.sha256(obj).hexdigest())
        self._seen[key] = entry
        return entry[1], len(obj)

    def forget_unseen(self) -> None:
        """Keep only what was pickled since the last call (the cache holds the objects)."""
        self._by_id, self._seen = self._seen, {}


class BlobPickler(pickle.Pickler):
    """A pickler that puts large ``bytes`` aside; ``found`` lists them, in order."""

    def __init__(self, file: Any, blobs: Blobs) -> None:
        super().__init__(file, protocol=PROTOCOL)
        self._blobs = blobs
        self.found: dict[str, bytes] = {}

    def persistent_id(self, obj: Any) -> BlobRef | None:
        if type(obj) is bytes and len(obj) >= BLOB_MIN:
            ref = self._blobs.ref(obj)
            self.found[ref[0]] = obj
            return ref
        return None


def dumps(value: Any, blobs: Blobs, *, large: bool = True) -> tuple[bytes, dict[str, bytes]]:
    """``value`` pickled, and the blobs it refers to (sha256 -> bytes).

    ``large=False``: the value was small last time. It is pickled by the C pickler alone
    first (``persistent_id`` is a Python call per object: a capture of 2,000 objects took
    1.5x as long, and a thread step changing ``self`` tore it more often, tests/session
    test_24); a pickle under ``BLOB_MIN`` cannot hold a blob, and only a larger one is made
    again with blobs put aside.
    """
    if not large:
        data = pickle.dumps(value, PROTOCOL)
        if len(data) < BLOB_MIN:
            return data, {}
    out = io.BytesIO()
    pickler = BlobPickler(out, blobs)
    pickler.dump(value)
    return out.getvalue(), pickler.found


def loads(data: bytes | memoryview, blob: Callable[[str, int], bytes]) -> Any:
    """Unpickle ``data``, asking ``blob(sha256, size)`` for each blob it refers to."""
    unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = lambda pid: blob(str(pid[0]), int(pid[1]))  # type: ignore[method-assign]
    return unpickler.load()
