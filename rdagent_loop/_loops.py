"""``step_idx``, ``loop_prev_out``, ``loop_trace``, ``withdraw_base``: per-loop maps that
know what changed.

Each is a ``defaultdict`` keyed by loop index, as in RD-Agent (a missing loop is created
with ``factory()`` when it is read with ``[]``). A map also notes which loops were
*touched* since the last snapshot took them: written, or read with ``[]``/``get`` when the
value is mutable (the reader may change it in place). A snapshot then pickles only the
touched loops (see ``_session/_pages.py``), so saving a step costs what that step changed,
not what the other 10,000 loops hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar

V = TypeVar("V")

_IMMUTABLE = (int, str, type(None))


class LoopMap(MutableMapping[int, V]):
    """Loop index -> value, a ``defaultdict(factory)`` that notes the loops touched."""

    def __init__(self, factory: Callable[[], V], values: dict[int, V] | None = None) -> None:
        self.factory = factory
        self._values: dict[int, V] = dict(values or {})
        self.touched: set[int] = set(self._values)
        # the lowest loop written since ``take_lowest_write``: what changed below a
        # "finished up to here" mark (``LoopBase.get_unfinished_loop_cnt``)
        self._lowest_write: int | None = None

    def _wrote(self, loop_idx: int) -> None:
        self.touched.add(loop_idx)
        low = self._lowest_write
        if low is None or loop_idx < low:
            self._lowest_write = loop_idx

    def __getitem__(self, loop_idx: int) -> V:
        try:
            value = self._values[loop_idx]
        except KeyError:
            value = self._values[loop_idx] = self.factory()
            self._wrote(loop_idx)
            return value
        if not isinstance(value, _IMMUTABLE):
            self.touched.add(loop_idx)
        return value

    def get(self, loop_idx: int, default: Any = None) -> Any:
        """Like ``dict.get``: a missing loop is not created."""
        value = self._values.get(loop_idx, default)
        if loop_idx in self._values and not isinstance(value, _IMMUTABLE):
            self.touched.add(loop_idx)
        return value

    def peek(self, loop_idx: int, default: Any = None) -> Any:
        """The engine's read: the value, without counting it as touched."""
        return self._values.get(loop_idx, default)

    def __setitem__(self, loop_idx: int, value: V) -> None:
        self._values[loop_idx] = value
        self._wrote(loop_idx)

    def __delitem__(self, loop_idx: int) -> None:
        del self._values[loop_idx]
        self._wrote(loop_idx)

    # as dict's (MutableMapping's would go through the missing-key default of ``[]``)

    def pop(self, loop_idx: int, *default: Any) -> Any:
        if loop_idx in self._values:
            self._wrote(loop_idx)
        return self._values.pop(loop_idx, *default)

    def setdefault(self, loop_idx: int, default: Any = None) -> Any:
        if loop_idx not in self._values:
            self[loop_idx] = default
        return self[loop_idx]

    def copy(self) -> LoopMap[V]:
        return LoopMap(self.factory, self._values)

    def __contains__(self, loop_idx: object) -> bool:
        return loop_idx in self._values

    def __iter__(self) -> Iterator[int]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def take_touched(self) -> set[int]:
        touched, self.touched = self.touched, set()
        return touched

    def take_lowest_write(self) -> int | None:
        low, self._lowest_write = self._lowest_write, None
        return low

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LoopMap):
            return self._values == other._values
        if isinstance(other, dict):
            return self._values == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LoopMap({self._values!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # the usual factories by name: cheaper than a builtin global, and stable
        factory = next((k for k, f in _FACTORIES.items() if f is self.factory), self.factory)
        return (_rebuild, (factory, self._values))


def no_value() -> None:
    """The factory of a map whose missing loops read as None (``withdraw_base``)."""


_FACTORIES: dict[str, Callable[[], Any]] = {
    "int": int,
    "list": list,
    "dict": dict,
    "none": no_value,
}


def _rebuild(factory: Callable[[], V] | str, values: dict[int, V]) -> LoopMap[V]:
    if isinstance(factory, str):
        factory = _FACTORIES[factory]
    return LoopMap(factory, values)


def peek(mapping: Any, loop_idx: int, default: Any = None) -> Any:
    """Read one loop's value for display, without counting it as touched (any mapping)."""
    if isinstance(mapping, LoopMap):
        return mapping.peek(loop_idx, default)
    return mapping.get(loop_idx, default)


PER_LOOP = ("step_idx", "loop_prev_out", "loop_trace", "withdraw_base")
"""The attributes of a loop that are saved loop by loop (when they are ``LoopMap``s)."""
