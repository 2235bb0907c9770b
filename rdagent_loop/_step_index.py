"""``loop.step_idx``: a ``defaultdict(int)`` whose pickle does not grow with finished loops.

RD-Agent keeps one entry per loop ever started (loop index -> next step to run), and a
snapshot after every step pickles all of them: the cost of a step grew with the length of
the run. Here the entries of the leading loops that are finished (their value no longer
changes) are *sealed* into packed pages; a full page is an immutable ``bytes`` object that
pickles as the same bytes each time, so a snapshot pickles one partial page and the few
loose entries (loops in flight, or keys set out of order) item by item.

It is still a ``defaultdict(int)`` (reads are plain dict reads). Every write method keeps the
bookkeeping right; a write to a sealed entry unseals from that entry on. Keys added or
removed behind the subclass's back (``dict.__setitem__(step_idx, ...)``) are caught by a
size check at pickling time, and the pickle then lists every entry; a value changed that
way in a sealed entry is not seen. After a pickle, sealed loops come first in iteration
order, then the others in the order they were set.
"""

from __future__ import annotations

from array import array
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

PAGE = 1024
"""Entries per sealed page."""


class StepIndex(defaultdict[int, int]):
    """Loop index -> index of the next step to run (``defaultdict(int)``)."""

    def __init__(self, *args: Any) -> None:
        # ``StepIndex(entries)``, or ``defaultdict``'s own ``StepIndex(int, entries)``, which
        # its ``|`` operator uses
        factory: Any = int
        if args and (args[0] is None or callable(args[0])):
            factory, args = args[0], args[1:]
        if len(args) > 1:
            raise TypeError(f"StepIndex takes at most one mapping of entries, got {len(args)}")
        entries: Mapping[int, int] | Iterable[tuple[int, int]] = args[0] if args else ()
        super().__init__(factory)
        self._pages: list[bytes] = []  # full pages of sealed values, loops 0.. in order
        self._page = array("q")  # the sealed values after the full pages
        self._loose: dict[int, None] = {}  # every key that is not sealed, in order
        self.update(entries)

    @property
    def sealed(self) -> int:
        """Loops ``0..sealed-1`` are sealed."""
        return len(self._pages) * PAGE + len(self._page)

    # -- writes ---------------------------------------------------------------------------

    def __setitem__(self, key: int, value: int) -> None:
        if key not in self._loose and not self._unseal_from(key):
            self._loose[key] = None
        super().__setitem__(key, value)

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)  # a KeyError leaves everything as it was
        self._unseal_from(key)
        self._loose.pop(key, None)

    def pop(self, key: int, *default: Any) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        return super().pop(key, *default)

    def popitem(self) -> tuple[int, int]:
        key, value = super().popitem()
        self._unseal_from(key)
        self._loose.pop(key, None)
        return key, value

    def setdefault(self, key: int, default: int = 0) -> int:
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> StepIndex:  # type: ignore[override,misc]
        self.update(other)
        return self

    def clear(self) -> None:
        super().clear()
        self._pages, self._page, self._loose = [], array("q"), {}

    def copy(self) -> StepIndex:
        return StepIndex(self.default_factory, self)

    __copy__ = copy

    def _unseal_from(self, key: object) -> bool:
        """If ``key`` is sealed, unseal it and the entries after it; return whether it was."""
        sealed = self.sealed
        if not isinstance(key, int) or not 0 <= key < sealed:
            return False
        self._loose = {**dict.fromkeys(range(key, sealed)), **self._loose}
        keep = array("q", b"".join(self._pages))
        keep.extend(self._page)
        del keep[key:]
        self._pages, self._page = [], array("q")
        self._seal_values(keep)
        return True

    # -- sealing and pickling -------------------------------------------------------------

    def seal(self, done: int) -> None:
        """Seal the leading loops whose value is at least ``done`` (finished loops)."""
        key = self.sealed
        while key in self._loose:
            value = self[key]
            if type(value) is not int or not done <= value < 2**63:  # a page holds int64s
                break
            del self._loose[key]
            self._seal_values((value,))
            key += 1

    def _seal_values(self, values: Iterable[int]) -> None:
        for value in values:
            self._page.append(value)
            if len(self._page) == PAGE:
                self._pages.append(self._page.tobytes())
                self._page = array("q")

    def __reduce__(self) -> tuple[Any, ...]:
        if len(self) != self.sealed + len(self._loose):  # written behind our back
            return (_rebuild, ((), b"", dict(self)))
        loose = {key: self[key] for key in self._loose}
        return (_rebuild, (tuple(self._pages), self._page.tobytes(), loose))

    def __repr__(self) -> str:
        return f"StepIndex({dict(self)!r})"


def _rebuild(pages: tuple[bytes, ...], page: bytes, loose: dict[int, int]) -> StepIndex:
    index = StepIndex()
    values = array("q", b"".join(pages))
    values.frombytes(page)
    dict.update(index, enumerate(values))
    index._seal_values(values)
    dict.update(index, loose)
    index._loose = dict.fromkeys(loose)
    return index
