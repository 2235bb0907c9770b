"""Loop classes for the snapshot tests (a module of their own, so snapshots can unpickle them).

Also imported by ``session_crash_child.py``, the child process of the crash test.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import looplib

from rdagent_loop import LoopBase, LoopSettings


class Chain(looplib.Chain):
    """s0 -> s1 -> s2 -> s3 (the engine tests' chain), under a name of this module."""


class OtherChain(Chain):
    """A subclass: loading its snapshots through ``Chain`` is fine."""


class Unrelated(LoopBase):
    def only(self, prev_out: dict[str, Any]) -> int:
        return 1


class Grows(LoopBase):
    """``record`` adds ``size`` bytes to ``self``; the steps return ``size`` bytes each."""

    def __init__(self, settings: LoopSettings | None = None, size: int = 20_000) -> None:
        super().__init__(settings)
        self.size = size
        self.history: list[bytes] = []

    def propose(self, prev_out: dict[str, Any]) -> bytes:
        return payload(prev_out[self.LOOP_IDX_KEY], 0, self.size)

    def record(self, prev_out: dict[str, Any]) -> int:
        self.history.append(payload(prev_out[self.LOOP_IDX_KEY], 1, self.size))
        return len(self.history)


class KeepsKnowledge(Chain):
    """RD-Agent's data-science loop: ``dump`` drops a big attribute and puts it back."""

    def __init__(self, settings: LoopSettings | None = None) -> None:
        super().__init__(settings)
        self.knowledge: bytes | None = b"k" * 1_000_000

    def dump(self, path: str | Path) -> None:
        knowledge, self.knowledge = self.knowledge, None
        try:
            super().dump(path)
        finally:
            self.knowledge = knowledge

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        loop = super().load(path, *args, **kwargs)
        loop.knowledge = b"reloaded"
        return loop


class Shaky:
    """An object whose ``__reduce__`` runs Python code (and gives other threads a chance)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> tuple[Any, ...]:
        # Python code runs here: without protection, the interpreter may switch threads now
        return (Shaky, (sum(range(50)) and self.n,))


class Crowded(LoopBase):
    """Holds a big dict of ``Shaky`` objects that a thread step keeps growing and shrinking."""

    def __init__(self, settings: LoopSettings | None = None) -> None:
        super().__init__(settings)
        self.crowd: dict[int, Shaky] = {i: Shaky(i) for i in range(2000)}

    def _churn(self, stop: threading.Event | None = None, seconds: float = 0.0) -> None:
        rng = random.Random(0)
        deadline = time.monotonic() + seconds
        while not stop.is_set() if stop is not None else time.monotonic() < deadline:
            key = rng.randrange(4000)
            if key in self.crowd:
                del self.crowd[key]
            else:
                self.crowd[key] = Shaky(key)

    async def start(self, prev_out: dict[str, Any]) -> int:
        return len(self.crowd)

    def mutate(self, prev_out: dict[str, Any]) -> int:
        """Runs on a worker thread while other loops' snapshots are taken."""
        self._churn(seconds=0.03)
        return len(self.crowd)

    async def finish(self, prev_out: dict[str, Any]) -> int:
        return len(self.crowd)


# -- the crash test's loop ----------------------------------------------------------------


def payload(li: int, si: int, size: int) -> bytes:
    """Deterministic bytes for step ``si`` of loop ``li``."""
    return random.Random(li * 100 + si).randbytes(size)


def mark(side: str, li: int, si: int) -> None:
    """Append one line per finished step body; O_APPEND keeps lines whole across processes."""
    fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{li} {si}\n".encode())
    finally:
        os.close(fd)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class CrashLoop(LoopBase):
    """Async and sync steps, outputs and state of varying size; every step logs its run."""

    def __init__(self, settings: LoopSettings, side: str) -> None:
        super().__init__(settings)
        self.side = side
        self.records: list[int] = []
        self.blobs: dict[int, bytes] = {}

    @staticmethod
    def sizes(li: int) -> tuple[int, int]:
        """(bytes of output per step, bytes ``record`` adds to self)."""
        return 1_000 + (li * 7_919) % 60_000, (li * 104_729) % 200_000

    async def propose(self, prev_out: dict[str, Any]) -> bytes:
        li = prev_out[self.LOOP_IDX_KEY]
        await anyio.sleep(0.002 * (li % 4))
        out = payload(li, 0, self.sizes(li)[0])
        mark(self.side, li, 0)
        return out

    def coding(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["propose"] == payload(li, 0, self.sizes(li)[0])
        time.sleep(0.001 * (li % 3))
        mark(self.side, li, 1)
        return digest(prev_out["propose"])

    async def running(self, prev_out: dict[str, Any]) -> bytes:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["coding"] == digest(payload(li, 0, self.sizes(li)[0]))
        await anyio.sleep(0.003)
        out = payload(li, 2, self.sizes(li)[0])
        mark(self.side, li, 2)
        return out

    def record(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["running"] == payload(li, 2, self.sizes(li)[0])
        self.records.append(li)
        self.blobs[li] = payload(li, 3, self.sizes(li)[1])
        mark(self.side, li, 3)
        return digest(self.blobs[li])

    @classmethod
    def expected_outputs(cls, li: int) -> dict[str, Any]:
        size, added = cls.sizes(li)
        return {
            cls.LOOP_IDX_KEY: li,
            "propose": payload(li, 0, size),
            "coding": digest(payload(li, 0, size)),
            "running": payload(li, 2, size),
            "record": digest(payload(li, 3, added)),
        }


class PolicyError(Exception):
    """A withdraw error."""


class Withdraws(LoopBase):
    """Loop 1's s1 withdraws once while loop 0's first s1 is in flight (and never ends)."""

    withdraw_loop_error = (PolicyError,)
    tries: dict[tuple[int, str], int] = {}  # class-level: a withdraw restores the instance
    cancelled: list[int] = []

    def _tried(self, li: int, name: str) -> int:
        n = self.tries[(li, name)] = self.tries.get((li, name), 0) + 1
        return n

    async def s0(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        self._tried(li, "s0")
        return f"s0@{li}"

    async def s1(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["s0"] == f"s0@{li}"
        n = self._tried(li, "s1")
        if li == 0 and n == 1:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                self.cancelled.append(li)
                raise
        if li == 1 and n == 1:
            while (0, "s1") not in self.tries:
                await anyio.sleep(0.001)
            raise PolicyError("withdraw loop 1")
        return f"s1@{li}"

    async def s2(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["s1"] == f"s1@{li}"
        return f"s2@{li}"


class Steady(Grows):
    """Like ``Grows``, but ``record`` leaves ``self`` as it is."""

    def record(self, prev_out: dict[str, Any]) -> int:
        return len(self.history)


# -- session format 0.2 (test_session_v02.py, session_large_crash_child.py) ---------------


class Mixed(LoopBase):
    """propose (async) -> coding (sync) -> running (async) -> record (sync).

    Each step returns ``out_size`` deterministic bytes; ``record`` also appends to ``self``.
    ``big`` bytes and ``many`` short strings of user state make a large snapshot.
    ``USER_STATE`` names the attributes a test compares between two loads.
    """

    USER_STATE = ("out_size", "big", "many", "records")

    def __init__(
        self,
        settings: LoopSettings | None = None,
        out_size: int = 1_000,
        big: int = 0,
        many: int = 0,
    ) -> None:
        super().__init__(settings)
        self.out_size = out_size
        self.big = payload(-1, 0, big)
        self.many = [f"item-{i}" for i in range(many)]
        self.records: list[int] = []

    def _begin(self, li: int, si: int) -> None:
        """Called when a step's body starts."""

    def _end(self, li: int, si: int) -> None:
        """Called when a step's body ends (its output is made)."""

    def _check(self, prev_out: dict[str, Any], before: str, si: int) -> int:
        li = int(prev_out[self.LOOP_IDX_KEY])
        assert prev_out[before] == payload(li, si, self.out_size), (li, before)
        return li

    async def propose(self, prev_out: dict[str, Any]) -> bytes:
        li = int(prev_out[self.LOOP_IDX_KEY])
        self._begin(li, 0)
        await anyio.lowlevel.checkpoint()
        out = payload(li, 0, self.out_size)
        self._end(li, 0)
        return out

    def coding(self, prev_out: dict[str, Any]) -> bytes:
        li = self._check(prev_out, "propose", 0)
        self._begin(li, 1)
        out = payload(li, 1, self.out_size)
        self._end(li, 1)
        return out

    async def running(self, prev_out: dict[str, Any]) -> bytes:
        li = self._check(prev_out, "coding", 1)
        self._begin(li, 2)
        await anyio.lowlevel.checkpoint()
        out = payload(li, 2, self.out_size)
        self._end(li, 2)
        return out

    def record(self, prev_out: dict[str, Any]) -> bytes:
        li = self._check(prev_out, "running", 2)
        self._begin(li, 3)
        self.records.append(li)
        out = payload(li, 3, self.out_size)
        self._end(li, 3)
        return out

    @classmethod
    def expected_outputs(cls, li: int, out_size: int) -> dict[str, Any]:
        outputs: dict[str, Any] = {cls.LOOP_IDX_KEY: li}
        outputs.update({name: payload(li, si, out_size) for si, name in enumerate(cls.steps)})
        return outputs


class LargeCrashLoop(Mixed):
    """``Mixed`` with a large state that ``record`` grows by ``blob`` bytes per loop.

    A step appends ``"<loop> <step>"`` to the file ``starts`` when its body starts, and to
    ``side`` when it ends: the crash test kills the run after some starts, and checks that no
    step a snapshot showed as done runs again.
    """

    USER_STATE = (*Mixed.USER_STATE, "blobs")

    def __init__(
        self,
        settings: LoopSettings,
        starts: str,
        side: str,
        out_size: int,
        big: int,
        many: int,
        blob: int,
    ) -> None:
        super().__init__(settings, out_size=out_size, big=big, many=many)
        self.starts = starts
        self.side = side
        self.blob = blob
        self.blobs: dict[int, bytes] = {}

    def _begin(self, li: int, si: int) -> None:
        mark(self.starts, li, si)

    def _end(self, li: int, si: int) -> None:
        if si == 3:
            self.blobs[li] = payload(li, 4, self.blob)
        mark(self.side, li, si)
