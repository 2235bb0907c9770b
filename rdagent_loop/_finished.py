"""Outputs and traces of finished loops: written to disk once, read back on access.

``loop_prev_out`` and ``loop_trace`` map every loop index to its values, like RD-Agent's
``defaultdict``\\ s. When a loop has finished, the next snapshot pickles its values once into
``<session>/<loop>/outputs-<sha256 prefix>`` and keeps only that hash in its own state, so
the size and cost of a snapshot do not grow with the number of finished loops. The values
of the last ``FinishedLoops.cache_size`` finished loops stay in memory; older ones are read
back (and checked against their hash) when someone reads them, so memory stays bounded.

A finished loop's values are a record: read them freely; assigning
``loop_prev_out[i] = ...`` makes them live again, and the next snapshot archives them anew.
Objects that a finished loop's outputs share with the rest of the loop object (an
experiment kept in a trace as well) are separate copies once read back from disk.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ._errors import SnapshotError
from ._session import OutputsBlob, capturing, consistently, outputs_path, write_outputs
from ._session._format import read_body, read_header

V = TypeVar("V")

_PROTOCOL = 5
# loop index, first 128 bits of the SHA-256 of the outputs file's body (the full hash is in
# that file's header, checked against the body; forging a body to match 128 bits is out of
# reach, and with a signing key these entries are signed with the snapshot)
_ENTRY = struct.Struct(">I16s")
_GONE = bytes(16)
_PAGE = 128 * _ENTRY.size


class FinishedLoops:
    """The archive of finished loops' records (``{"prev_out": ..., "trace": ...}``)."""

    cache_size: ClassVar[int] = 8
    """How many finished loops' records stay in memory."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self.snapshot_version = 0  # changes with what __getstate__ returns (see _capture.py)
        self._refs: dict[int, bytes] = {}  # loop -> hash (prefix) of its outputs file
        # the same as a log of packed entries in pages: what is pickled. Full pages are
        # never touched again, so they pickle to the same bytes in every snapshot.
        self._pages: list[bytes] = [b""]
        self._pending: dict[int, bytes] = {}  # bodies not on disk yet
        self._cache: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self._lock = threading.RLock()

    @property
    def folder(self) -> Path:
        return self._folder

    @folder.setter
    def folder(self, folder: Path) -> None:
        self._folder = folder
        self.snapshot_version += 1

    def __contains__(self, loop_idx: object) -> bool:
        return loop_idx in self._refs

    def keys(self) -> list[int]:
        return list(self._refs)

    def record(self, loop_idx: int) -> dict[str, Any]:
        """The record of a finished loop, from memory or from its file."""
        with self._lock:
            cached = self._cache.get(loop_idx)
            if cached is not None:
                self._cache.move_to_end(loop_idx)
                return cached
            digest = self._refs[loop_idx].hex()
            data = self._pending.get(loop_idx)
            if data is None:
                data = self._read(loop_idx, digest)
            record: dict[str, Any] = pickle.loads(data)
            self._remember(loop_idx, record)
            return record

    def _read(self, loop_idx: int, digest: str) -> bytes:
        path = outputs_path(self.folder, loop_idx, digest)
        try:
            with path.open("rb") as f:
                header = read_header(f, path, None)
                if header.kind != "outputs" or not header.body_sha256.startswith(digest):
                    raise SnapshotError(f"{path} is not the file the snapshot refers to")
                return read_body(f, path, header)
        except (OSError, SnapshotError) as exc:
            raise SnapshotError(
                f"the outputs of finished loop {loop_idx} cannot be read back: {exc}"
            ) from exc

    def _remember(self, loop_idx: int, record: dict[str, Any]) -> None:
        self._cache[loop_idx] = record
        self._cache.move_to_end(loop_idx)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def add(self, loop_idx: int, record: dict[str, Any]) -> OutputsBlob:
        """Archive ``record``; return the file to write (the caller's snapshot job writes it)."""
        data = consistently(lambda: pickle.dumps(record, protocol=_PROTOCOL))
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._refs[loop_idx] = bytes.fromhex(digest)[: _ENTRY.size - 4]
            self._log(loop_idx, self._refs[loop_idx])
            self._pending[loop_idx] = data
            self._remember(loop_idx, record)

        def written() -> None:
            with self._lock:
                if self._pending.get(loop_idx) is data:
                    del self._pending[loop_idx]

        return OutputsBlob(self.folder, loop_idx, digest, data, written)

    def _log(self, loop_idx: int, digest: bytes) -> None:
        self.snapshot_version += 1
        if len(self._pages[-1]) >= _PAGE:
            self._pages.append(b"")
        self._pages[-1] += _ENTRY.pack(loop_idx, digest)

    def discard(self, loop_idx: int) -> None:
        with self._lock:
            if self._refs.pop(loop_idx, None) is not None:
                self._log(loop_idx, _GONE)
            self._pending.pop(loop_idx, None)
            self._cache.pop(loop_idx, None)

    def copy_to(self, folder: Path, durability: Any) -> None:
        """Make this archive readable from another session folder (a fork)."""
        with self._lock:
            for loop_idx, raw in self._refs.items():
                digest = raw.hex()
                target = outputs_path(folder, loop_idx, digest)
                if target.exists():
                    continue
                pending = self._pending.get(loop_idx)
                if pending is not None:
                    full = hashlib.sha256(pending).hexdigest()
                    write_outputs(OutputsBlob(folder, loop_idx, full, pending), durability)
                    continue
                source = outputs_path(self.folder, loop_idx, digest)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:  # files are never changed in place, so a hard link is a safe copy
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            self.folder = folder

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            return {
                "folder": self.folder,
                "refs": list(self._pages),
                # a snapshot's own job writes them; a plain copy (a worker's) carries them
                "pending": {} if capturing.get() else dict(self._pending),
            }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._folder = state["folder"]
        self.snapshot_version = 0
        self._pages = list(state["refs"])
        self._refs = {}
        for page in self._pages:
            for loop_idx, digest in _ENTRY.iter_unpack(page):
                if digest == _GONE:
                    self._refs.pop(loop_idx, None)
                else:
                    self._refs[loop_idx] = digest
        self._pending = state["pending"]
        self._cache = OrderedDict()
        self._lock = threading.RLock()


class LoopMap(MutableMapping[int, V]):
    """Loop index -> value (``loop_prev_out``, ``loop_trace``), a ``defaultdict`` whose
    finished loops' values live in a :class:`FinishedLoops` archive."""

    def __init__(
        self, factory: Callable[[], V], field: str, archive: FinishedLoops | None = None
    ) -> None:
        self.factory = factory
        self.field = field
        self._archive = archive
        self._live: dict[int, V] = {}
        self._hidden: set[int] = set()  # archived, but deleted from this map

    def attach(self, archive: FinishedLoops) -> None:
        self._archive = archive

    def _archived(self, loop_idx: object) -> bool:
        archive = self._archive
        return archive is not None and loop_idx in archive and loop_idx not in self._hidden

    def __getitem__(self, loop_idx: int) -> V:
        try:
            return self._live[loop_idx]
        except KeyError:
            pass
        if self._archived(loop_idx):
            assert self._archive is not None
            value: V = self._archive.record(loop_idx)[self.field]
            return value
        value = self._live[loop_idx] = self.factory()
        self._hidden.discard(loop_idx)
        return value

    def __setitem__(self, loop_idx: int, value: V) -> None:
        self._live[loop_idx] = value
        self._hidden.discard(loop_idx)

    def __delitem__(self, loop_idx: int) -> None:
        found = loop_idx in self._live
        self._live.pop(loop_idx, None)
        if self._archived(loop_idx):
            self._hidden.add(loop_idx)
            found = True
        if not found:
            raise KeyError(loop_idx)

    def __contains__(self, loop_idx: object) -> bool:
        return loop_idx in self._live or self._archived(loop_idx)

    def _keys(self) -> list[int]:
        archived = self._archive.keys() if self._archive is not None else []
        keys = {li for li in archived if li not in self._hidden}
        keys.update(self._live)
        return sorted(keys)

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def get(self, loop_idx: int, default: Any = None) -> Any:
        """Like ``dict.get``: a missing loop is not created."""
        return self[loop_idx] if loop_idx in self else default  # noqa: SIM401

    def live_keys(self) -> list[int]:
        """Loops whose values are in memory only (not archived yet)."""
        return list(self._live)

    def settle(self, loop_idx: int) -> None:
        """The loop was archived: its live value now lives in the archive."""
        self._live.pop(loop_idx, None)
        self._hidden.discard(loop_idx)

    def __repr__(self) -> str:
        archived = self._archive.keys() if self._archive is not None else []
        on_disk = sorted(li for li in archived if li not in self._hidden and li not in self._live)
        return f"LoopMap({self.field}: {dict(self._live)!r}, finished on disk: {on_disk})"

    def __reduce__(self) -> tuple[Any, ...]:
        # the archive is not part of the map's pickle: LoopBase.__setstate__ attaches it;
        # the usual factories by name (a builtin global costs more than the map's values)
        factory = next((k for k, f in _FACTORIES.items() if f is self.factory), self.factory)
        return (_rebuild_map, (factory, self.field, self._live, self._hidden))


_FACTORIES: dict[str, Callable[[], Any]] = {"list": list, "dict": dict}


def _rebuild_map(
    factory: Callable[[], V] | str, field: str, live: dict[int, V], hidden: set[int]
) -> LoopMap[V]:
    if isinstance(factory, str):
        factory = _FACTORIES[factory]
    mapping = LoopMap(factory, field)
    mapping._live = live
    mapping._hidden = hidden
    return mapping


def archive_finished(
    archive: FinishedLoops, maps: Sequence[LoopMap[Any]], finished: Callable[[int], bool]
) -> list[OutputsBlob]:
    """Move the live values of finished loops into the archive; return the files to write."""
    done = sorted({li for m in maps for li in m.live_keys() if finished(li)})
    blobs = []
    for li in done:
        record = {m.field: m.get(li, m.factory()) for m in maps}
        blobs.append(archive.add(li, record))
        for m in maps:
            m.settle(li)
    return blobs
