"""The per-loop state in pages: a step's save costs the loops it changed, not all of them.

Each loop's *record* (its ``step_idx``, ``loop_prev_out`` and ``loop_trace`` entries) is
pickled on its own, when the loop was touched (see ``_loops.py``). Records live in *pages*
of ``PAGE`` consecutive loops, stored by content hash::

    step file ─> newest sealed page 624 (loops 9984..9999) ─> page 623 ─> ... ─> page 0
              └> open pages: page 625 (loops 10000.., some in flight), ...

A page whose loops have all finished is *sealed*: written once, pointing at the sealed page
before it. A step file names the newest sealed page and the open pages; saving a step
writes the one open page that changed. A record changed after its page was sealed (rare:
code that edits a finished loop's outputs) is kept in an open page that overrides it.

A page is a line of JSON (the previous sealed page, and per loop: its index, the size of
its record and the blobs it refers to), then the records. Reading one never unpickles
anything before it is checked against its hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import SnapshotError
from ._blobs import BlobRef, Blobs, dumps

PAGE = 16
RECORD_INLINE_MAX = 4 * 1024
"""A record larger than this is a file of the store of its own, which its page names: an
open page is written again at each step of its loops, and must stay small."""

Ref = tuple[int, str]
"""(size, sha256 hex) of a file in the store."""

Record = tuple[bytes, dict[str, bytes], bytes]
"""A loop's pickled record, the blobs it refers to, and a short hash of it."""


class PageRef:
    """A page of the store: a new one holds its bytes as parts (the records themselves,
    never copied: a job queued behind a busy disk costs no page-sized buffer); a page read
    back holds only its name. Its SHA-256 is computed once, when first asked for (by the
    writer, in order)."""

    __slots__ = ("_sha", "parts", "size")

    def __init__(
        self, parts: list[bytes] | None = None, *, size: int = 0, sha: str | None = None
    ) -> None:
        self.parts = parts or []
        self.size = sum(map(len, self.parts)) if parts is not None else size
        self._sha = sha

    @property
    def sha(self) -> str:
        if self._sha is None:
            digest = hashlib.sha256()
            for part in self.parts:
                digest.update(part)
            self._sha = digest.hexdigest()
        return self._sha

    def ref(self) -> list[Any]:
        return [self.size, self.sha]


@dataclass
class LoopPages:
    """What the session holds of the per-loop state, to save only what changed.

    Kept beside the loop object (never in a snapshot), seeded by ``load``.
    """

    records: dict[int, tuple[bytes, tuple[BlobRef, ...]]] = field(default_factory=dict)
    """The pickled record of each loop of an open page, and its blobs."""
    stored: dict[int, str] = field(default_factory=dict)
    """Loop -> the store file holding its record, for records too large for a page."""
    digests: dict[int, bytes] = field(default_factory=dict)
    """A hash of every loop's last record (sealed ones too): is a touched loop changed?"""
    open: dict[int, PageRef] = field(default_factory=dict)
    """Open page -> its last version."""
    chain: PageRef | None = None
    """The newest sealed page."""
    sealed: int = 0
    """Pages ``0..sealed-1`` are in the chain."""
    _new_blobs: dict[str, bytes] = field(default_factory=dict)

    def pickle_records(
        self, maps: Mapping[str, Any], touched: set[int], blobs: Blobs
    ) -> dict[int, Record | None]:
        """The records of the touched loops that changed (None: the loop is gone). Changes
        nothing here, so a capture torn by another thread can be taken again."""
        records: dict[int, Record | None] = {}
        for li in touched:
            record = {name: m.peek(li) for name, m in maps.items() if li in m}
            if not record:
                if li in self.digests:
                    records[li] = None
                continue
            data, found = dumps(record, blobs, large=False)
            digest = hashlib.blake2b(data, digest_size=16).digest()
            if self.digests.get(li) != digest:
                records[li] = (data, found, digest)
        return records

    def commit(
        self, records: dict[int, Record | None], finished: Callable[[int], bool], admitted: int
    ) -> list[PageRef]:
        """Take the changed records; return the pages sealed now (to store)."""
        changed: set[int] = set()
        for li, record in records.items():
            changed.add(li // PAGE)
            if record is None:
                self.digests.pop(li, None)
                self.records.pop(li, None)
                self.stored.pop(li, None)
                continue
            data, found, digest = record
            self._new_blobs.update(found)
            self.digests[li] = digest
            self.records[li] = (data, tuple((sha, len(b)) for sha, b in found.items()))
            if len(data) > RECORD_INLINE_MAX:
                sha = hashlib.sha256(data).hexdigest()
                self.stored[li] = sha
                self._new_blobs[sha] = data
            else:
                self.stored.pop(li, None)
        pages = []
        while self._sealable(finished, admitted):
            pages.append(self._seal())
            changed.discard(self.sealed - 1)
        for page in sorted(changed):  # the step file keeps them, or stores them (capture)
            self.open[page] = self._page(page, prev=None)
        return pages

    def take_new_blobs(self) -> dict[str, bytes]:
        """The blobs of the records committed since the last call."""
        blobs, self._new_blobs = self._new_blobs, {}
        return blobs

    def _sealable(self, finished: Callable[[int], bool], admitted: int) -> bool:
        first = self.sealed * PAGE
        if first + PAGE > admitted:
            return False
        return all(finished(li) for li in range(first, first + PAGE))

    def _seal(self) -> PageRef:
        page = self.sealed
        new = self.chain = self._page(page, prev=self.chain)
        self.sealed += 1
        self.open.pop(page, None)
        for li in range(page * PAGE, page * PAGE + PAGE):
            self.records.pop(li, None)
            self.stored.pop(li, None)
        return new

    def _page(self, page: int, prev: PageRef | None) -> PageRef:
        lo = page * PAGE
        loops = [li for li in range(lo, lo + PAGE) if li in self.records]
        entries: list[list[Any]] = []
        inline = []
        for li in loops:
            data, blobs = self.records[li]
            entries.append([li, len(data), blobs])
            sha = self.stored.get(li)
            if sha is None:
                inline.append(data)
            else:
                entries[-1].append(sha)  # in the store, not in the page
        fields = {"prev": None if prev is None else prev.ref(), "loops": entries}
        head = json.dumps(fields, separators=(",", ":")).encode()
        return PageRef([head, b"\n", *inline])

    def picture(self) -> PagesPicture:
        """What a step file taken now points at (named once the writer gets to it)."""
        return PagesPicture(self.chain, self.sealed, dict(self.open))


@dataclass(slots=True)
class PagesPicture:
    chain: PageRef | None
    sealed: int
    open: dict[int, PageRef]
    inline: bool = False
    """The open pages are in the step file itself, after the attributes."""

    def manifest(self) -> dict[str, Any]:
        return {
            "chain": None if self.chain is None else self.chain.ref(),
            "sealed": self.sealed,
            "open": [
                [page, self.open[page].size] if self.inline else [page, *self.open[page].ref()]
                for page in sorted(self.open)
            ],
        }


@dataclass
class PageEntry:
    loop_idx: int
    data: memoryview | bytes
    blobs: list[BlobRef]
    stored: str | None = None  # the store file of a record too large for its page
    size: int = 0


def parse_page(data: bytes, what: str) -> tuple[Ref | None, list[PageEntry]]:
    """The previous sealed page and the records of a page already checked against its hash."""
    end = data.find(b"\n")
    try:
        head = json.loads(data[:end])
        prev = head["prev"]
        prev_ref = None if prev is None else (int(prev[0]), str(prev[1]))
        view = memoryview(data)
        pos = end + 1
        entries = []
        for li, size, refs, *stored in head["loops"]:
            blobs = [(str(s), int(n)) for s, n in refs]
            if stored:  # read by the caller, from the store
                entries.append(PageEntry(int(li), b"", blobs, str(stored[0]), int(size)))
                continue
            entries.append(PageEntry(int(li), view[pos : pos + size], blobs))
            pos += size
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{what} is corrupt: {exc!r}") from None
    if pos != len(data):
        raise SnapshotError(f"{what} is corrupt: its records do not add up")
    return prev_ref, entries
