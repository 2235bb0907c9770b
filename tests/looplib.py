"""Small loop classes shared by the engine tests (importable, so snapshots unpickle)."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import looptime
import pytest
import trio.testing

from rdagent_loop import LoopBase


def virtual_clock_params() -> list[Any]:
    """Backends with a virtual clock that jumps whenever every task is blocked."""
    return [
        pytest.param(
            (
                "asyncio",
                {
                    "loop_factory": functools.partial(looptime.new_event_loop, start=0),
                    "debug": True,
                },
            ),
            id="asyncio-looptime",
        ),
        pytest.param(
            ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}),
            id="trio-mockclock",
        ),
    ]


async def run_cancelled_after(loop: LoopBase, seconds: float, **budgets: Any) -> None:
    """Run ``loop``, cancelled from outside ``seconds`` after its first step started.

    Not after the call: a run takes its session's lock in a worker thread before any step,
    and a virtual clock jumps while a real thread works, past a deadline already set.
    """
    run = loop.run(**budgets)
    with anyio.CancelScope() as scope:
        async with run as results:
            while not run.statistics().steps_running:
                await anyio.sleep(0.001)
            scope.deadline = anyio.current_time() + seconds
            async for _ in results:
                pass


class CoderError(Exception):
    """A skip error: the loop jumps ahead to its skip target."""


class PolicyError(Exception):
    """A withdraw error: the run rolls back and starts a new generation."""


class Chain(LoopBase):
    """s0 → s1 → s2 → s3; each step checks its predecessor's output and logs its execution."""

    def __init__(self, settings: Any = None, delay: float = 0.0) -> None:
        super().__init__(settings)
        self.delay = delay
        self.executed: list[tuple[int, str]] = []

    async def _step(self, name: str, before: str | None, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        if before is not None:
            assert prev_out[before] == f"{before}@{li}", (name, prev_out)
        if self.delay:
            await anyio.sleep(self.delay)
        self.executed.append((li, name))
        return f"{name}@{li}"

    async def s0(self, prev_out: dict[str, Any]) -> str:
        return await self._step("s0", None, prev_out)

    async def s1(self, prev_out: dict[str, Any]) -> str:
        return await self._step("s1", "s0", prev_out)

    async def s2(self, prev_out: dict[str, Any]) -> str:
        return await self._step("s2", "s1", prev_out)

    async def s3(self, prev_out: dict[str, Any]) -> str:
        return await self._step("s3", "s2", prev_out)


class SyncChain(LoopBase):
    """The same shape with sync no-op steps."""

    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    def s1(self, prev_out: dict[str, Any]) -> int:
        assert "s0" in prev_out
        return 1

    def s2(self, prev_out: dict[str, Any]) -> int:
        assert "s1" in prev_out
        return 2

    def s3(self, prev_out: dict[str, Any]) -> int:
        assert "s2" in prev_out
        return 3


class Concurrency:
    """Counts how many instances of each step run at once."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def hold(self, name: str, seconds: float) -> None:
        self.now[name] = self.now.get(name, 0) + 1
        self.peak[name] = max(self.peak.get(name, 0), self.now[name])
        try:
            await anyio.sleep(seconds)
        finally:
            self.now[name] -= 1


class RDLoop(LoopBase):
    """RD-Agent's shape, with async steps that record their concurrency."""

    skip_loop_error = (CoderError,)
    withdraw_loop_error = (PolicyError,)

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.conc = Concurrency()
        self.records: list[int] = []

    async def direct_exp_gen(self, prev_out: dict[str, Any]) -> int:
        await self.conc.hold("direct_exp_gen", 0.01)
        return int(prev_out[self.LOOP_IDX_KEY])

    async def coding(self, prev_out: dict[str, Any]) -> str:
        await self.conc.hold("coding", 1)
        return f"code{prev_out['direct_exp_gen']}"

    async def running(self, prev_out: dict[str, Any]) -> str:
        await self.conc.hold("running", 1)
        return f"ran {prev_out['coding']}"

    async def feedback(self, prev_out: dict[str, Any]) -> str:
        await self.conc.hold("feedback", 0.5)
        return "fb"

    async def record(self, prev_out: dict[str, Any]) -> None:
        await self.conc.hold("record", 0.5)
        self.records.append(int(prev_out[self.LOOP_IDX_KEY]))
