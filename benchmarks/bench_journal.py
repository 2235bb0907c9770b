"""The step journal (docs/benchmarks.md): what a memoized call costs, and what a replay saves.

``python -m benchmarks.bench_journal`` prints a table; ``run()`` returns its rows
``(what, figure, bar)`` for ``python -m benchmarks``. Everything goes through the public API.

* one async step makes ``CALLS`` sequential ``memo`` calls with distinct keys, each returning
  1 KB, at ``durability="flush"`` and ``"fsync"``; the same step calling the function without
  ``memo`` is the floor, and the cost of a memo call is the difference, per call;
* replay: the same step raises after its calls on its first attempt and has ``retries=1``,
  so its second attempt finds every key journaled; timed inside that attempt;
* ``memo_blocking`` in a sync step on each executor (inline, thread, process), ``"flush"``,
  and its replay in a worker process (every lookup a round trip through the pool's pipe).

The time is measured inside the step, so the run's start (session lock, writer process) and
its snapshots do not count. Machines are noisy: compare the figures of one run.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import anyio

from benchmarks._scratch import scratch
from benchmarks.bench_engine import format_table
from rdagent_loop import LoopBase, LoopSettings, StepResult, step

Row = tuple[str, str, str]

BACKENDS = ("asyncio", "trio")
REPEATS = 3
REPEAT_BUDGET_S = 10.0  # fewer repeats once one figure has taken this long
CALLS = 2000  # memo calls of one step, "flush"
FSYNC_CALLS = 200  # "fsync": each call waits for the disk
PAYLOAD = os.urandom(1024)  # what each "model call" returns

Durability = Literal["flush", "fsync"]
Executor = Literal["inline", "thread", "process"]


class Again(Exception):
    """Raised by the first attempt of a replay measurement: the retry replays every call."""


class _Calls(LoopBase):
    """start → work → end: ``work`` makes ``calls`` calls (memoized or not) and returns how
    long they took; with ``fail_first`` an attempt that really made them raises instead."""

    def __init__(self, settings: LoopSettings, *, calls: int, memoize: bool, fail_first: bool):
        super().__init__(settings)
        self.calls = calls
        self.memoize = memoize
        self.fail_first = fail_first

    async def start(self, prev_out: dict[str, Any]) -> None:
        return None

    async def end(self, prev_out: dict[str, Any]) -> None:
        return None


class AsyncCalls(_Calls):
    @step(backoff=0.0)
    async def work(self, prev_out: dict[str, Any]) -> float:
        made: list[int] = []

        def model_call() -> bytes:
            made.append(1)
            return PAYLOAD

        started = time.perf_counter()
        if self.memoize:
            for k in range(self.calls):
                await self.memo(f"call-{k}", model_call)
        else:
            for _ in range(self.calls):
                model_call()
        seconds = time.perf_counter() - started
        if self.fail_first and made:
            raise Again(f"{len(made)} calls made: the retry replays them")
        return seconds


class BlockingCalls(_Calls):
    @step(backoff=0.0)
    def work(self, prev_out: dict[str, Any]) -> float:
        made: list[int] = []

        def model_call() -> bytes:
            made.append(1)
            return PAYLOAD

        started = time.perf_counter()
        if self.memoize:
            for k in range(self.calls):
                self.memo_blocking(f"call-{k}", model_call)
        else:
            for _ in range(self.calls):
                model_call()
        seconds = time.perf_counter() - started
        if self.fail_first and made:
            raise Again(f"{len(made)} calls made: the retry replays them")
        return seconds


async def _step_seconds(
    cls: type[_Calls],
    *,
    calls: int,
    memoize: bool,
    durability: Durability = "flush",
    executor: Executor | None = None,
    replay: bool = False,
) -> float:
    """How long the ``work`` step's calls took (its last attempt's)."""
    extra: dict[str, Any] = {}
    if executor is not None:
        extra["step_executor"] = {"work": executor}
    if replay:
        extra["step_retries"] = {"work": 1}
    settings = LoopSettings(
        trace_path=scratch("journal-"), progress=False, durability=durability, **extra
    )
    loop = cls(settings, calls=calls, memoize=memoize, fail_first=replay)
    work: StepResult | None = None
    async with loop.run(loop_n=1) as results:
        async for item in results:
            if isinstance(item, StepResult) and item.step_name == "work":
                work = item
    assert work is not None
    assert work.attempts == (2 if replay else 1), work
    return float(work.output)


def _median_seconds(backend: str, **kwargs: Any) -> float:
    """The median of up to ``REPEATS`` measurements, fewer once they took ``REPEAT_BUDGET_S``."""
    results: list[float] = []
    started = time.perf_counter()
    while len(results) < REPEATS:
        results.append(anyio.run(_call(_step_seconds, **kwargs), backend=backend))
        if time.perf_counter() - started > REPEAT_BUDGET_S:
            break
    return statistics.median(results)


def _call(fn: Callable[..., Any], **kwargs: Any) -> Callable[[], Any]:
    async def call() -> Any:
        return await fn(**kwargs)

    return call


def _rate(calls: int, seconds: float, floor: float) -> str:
    """``12,345 calls/s (81 us/call over the floor)``."""
    over = (seconds - floor * calls) / calls * 1e6
    return f"{calls / seconds:,.0f} calls/s ({over:,.0f} us/call over the floor)"


def run() -> list[Row]:
    """Measure everything; return rows of (what, figure, bar)."""
    engine_log = logging.getLogger("rdagent_loop")
    level = engine_log.level
    engine_log.setLevel(logging.ERROR)  # not the warning of every first attempt that fails
    try:
        return _rows(_measure())
    finally:
        engine_log.setLevel(level)


def _measure() -> dict[tuple[str, str], float]:
    figures: dict[tuple[str, str], float] = {}
    # every "flush" figure before any "fsync" one, whose write-back would slow what follows
    for backend in BACKENDS:
        figures[(backend, "floor")] = (
            _median_seconds(backend, cls=AsyncCalls, calls=CALLS, memoize=False) / CALLS
        )
        figures[(backend, "flush")] = _median_seconds(
            backend, cls=AsyncCalls, calls=CALLS, memoize=True
        )
        figures[(backend, "replay")] = _median_seconds(
            backend, cls=AsyncCalls, calls=CALLS, memoize=True, replay=True
        )
    blocking_floor = (
        _median_seconds("asyncio", cls=BlockingCalls, calls=CALLS, memoize=False) / CALLS
    )
    executors: tuple[Executor, ...] = ("inline", "thread", "process")
    for executor in executors:
        figures[("asyncio", executor)] = _median_seconds(
            "asyncio", cls=BlockingCalls, calls=CALLS, memoize=True, executor=executor
        )
    figures[("asyncio", "process-replay")] = _median_seconds(
        "asyncio", cls=BlockingCalls, calls=CALLS, memoize=True, executor="process", replay=True
    )
    for backend in BACKENDS:
        figures[(backend, "fsync")] = _median_seconds(
            backend, cls=AsyncCalls, calls=FSYNC_CALLS, memoize=True, durability="fsync"
        )
    figures[("asyncio", "blocking-floor")] = blocking_floor
    return figures


def _rows(figures: dict[tuple[str, str], float]) -> list[Row]:
    rows: list[Row] = []
    blocking_floor = figures[("asyncio", "blocking-floor")]
    for backend in BACKENDS:
        tag = f"[{backend}]"
        floor = figures[(backend, "floor")]
        rows.append(
            (
                f"{tag} floor: {CALLS} calls returning 1 KB in one async step, no memo",
                f"{1 / floor:,.0f} calls/s",
                "reference",
            )
        )
        rows.append(
            (
                f'{tag} await memo(), {CALLS} distinct keys, 1 KB each, durability="flush"',
                _rate(CALLS, figures[(backend, "flush")], floor),
                "reported",
            )
        )
        rows.append(
            (
                f'{tag} the same, {FSYNC_CALLS} keys, durability="fsync"',
                _rate(FSYNC_CALLS, figures[(backend, "fsync")], floor),
                "reported",
            )
        )
        replay = figures[(backend, "replay")]
        flush = figures[(backend, "flush")]
        rows.append(
            (
                f"{tag} replay: the step run again (retries=1), its {CALLS} keys journaled",
                _rate(CALLS, replay, floor) + f"; {flush / replay:,.0f}x the recording",
                "reported",
            )
        )
    for executor in ("inline", "thread", "process"):
        rows.append(
            (
                f'[asyncio] memo_blocking(), {CALLS} keys, "flush", sync step on {executor}',
                _rate(CALLS, figures[("asyncio", executor)], blocking_floor),
                "reported",
            )
        )
    rows.append(
        (
            f"[asyncio] memo_blocking() replay in a worker process, {CALLS} keys",
            _rate(CALLS, figures[("asyncio", "process-replay")], blocking_floor),
            "reported",
        )
    )
    return rows


def main() -> None:
    print(format_table(run()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
