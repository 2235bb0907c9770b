"""Engine benchmarks: overhead, parallel efficiency, error release, backpressure.

Each figure is measured on asyncio and on trio and is the median of a few repeats. Machines
are noisy: read the ratios measured in one run, not the absolute numbers. docs/benchmarks.md
explains each row and its bar.

    python -m benchmarks.bench_engine        # this file's rows only
    python -m benchmarks                     # every benchmark, one table
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio

from benchmarks._scratch import scratch
from rdagent_loop import LoopBase, LoopSettings

Row = tuple[str, str, str]
T = TypeVar("T")

BACKENDS = ("asyncio", "trio")
REPEATS = 3
REPEAT_BUDGET_S = 4.0

OLD_ENGINE_STEPS_PER_S = 404  # the asyncio engine we replace, on a 2-core machine like ours
OVERHEAD_STEPS = 2000
OVERHEAD_BAR = 2000  # steps/s with snapshots

PAR_LOOPS, PAR_STEPS, PAR_STEP_S = 20, 5, 0.05
PAR_LIMITS = (4, 16, 64)
PAR_BAR = 1.05

ERROR_BAR_S = 0.1
SIBLING_S = 10.0  # how long the siblings of the failing step would run if not cancelled

CONSUMED = 200  # items the slow consumer reads before it stops
CONSUMER_SLEEP_S = 0.003
OUTPUT_BYTES = 20_000
BUFFER = 16
CONSUMER_PARALLEL = 4
CONSUMER_BAR = 1.2


# -- loop classes -----------------------------------------------------------------------------


class NoOp(LoopBase):
    """Four async no-op steps: what the engine costs per step, and nothing else."""

    async def s0(self, prev_out: dict[str, Any]) -> None:
        return None

    async def s1(self, prev_out: dict[str, Any]) -> None:
        return None

    async def s2(self, prev_out: dict[str, Any]) -> None:
        return None

    async def s3(self, prev_out: dict[str, Any]) -> None:
        return None


class Sleepy(LoopBase):
    """Five async steps that each wait ``PAR_STEP_S`` (I/O-bound work: an API call, a job)."""

    async def s0(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(PAR_STEP_S)

    async def s1(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(PAR_STEP_S)

    async def s2(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(PAR_STEP_S)

    async def s3(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(PAR_STEP_S)

    async def s4(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(PAR_STEP_S)


class Boom(Exception):
    pass


class FailsBesideSiblings(LoopBase):
    """Loop 3's second step fails while loops 0-2 wait in theirs for ``SIBLING_S``."""

    def __init__(self, settings: LoopSettings) -> None:
        super().__init__(settings)
        self.raised_at = 0.0

    async def s0(self, prev_out: dict[str, Any]) -> None:
        return None

    async def s1(self, prev_out: dict[str, Any]) -> None:
        if prev_out[self.LOOP_IDX_KEY] == 3:
            await anyio.sleep(0.2)  # let the siblings settle into their long waits
            self.raised_at = time.perf_counter()
            raise Boom("loop 3 failed")
        await anyio.sleep(SIBLING_S)


class Producer(LoopBase):
    """Two steps that each return a fresh ``OUTPUT_BYTES`` payload, as fast as they can."""

    async def s0(self, prev_out: dict[str, Any]) -> bytes:
        return bytes(OUTPUT_BYTES)

    async def s1(self, prev_out: dict[str, Any]) -> bytes:
        return bytes(OUTPUT_BYTES)


# -- measurements -----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _run(fn: Callable[..., Awaitable[T]], backend: str, *args: Any) -> T:
    return anyio.run(fn, *args, backend=backend)


def _repeat(fn: Callable[..., Awaitable[T]], backend: str, *args: Any) -> list[T]:
    """Up to ``REPEATS`` measurements, fewer when one figure has taken ``REPEAT_BUDGET_S``.

    So a slow figure (the engine at 1% of its bar) still finishes in reasonable time.
    """
    results: list[T] = []
    started = time.perf_counter()
    while len(results) < REPEATS:
        results.append(_run(fn, backend, *args))
        if time.perf_counter() - started > REPEAT_BUDGET_S:
            break
    return results


def _settings(tmp: str | Path, **kwargs: Any) -> LoopSettings:
    return LoopSettings(trace_path=Path(tmp), progress=False, **kwargs)


async def _floor() -> float:
    """Await the same no-op step functions in a plain loop: the floor of any engine."""
    loop = NoOp(LoopSettings(trace_path=Path(tempfile.gettempdir()), progress=False))
    funcs = [getattr(loop, name) for name in loop.steps]
    prev_out: dict[str, Any] = {}
    started = time.perf_counter()
    for i in range(OVERHEAD_STEPS):
        prev_out[loop.steps[i % 4]] = await funcs[i % 4](prev_out)
    return OVERHEAD_STEPS / (time.perf_counter() - started)


Mode = Literal["off", "flush", "flush-thread", "fsync"]


async def _engine(snapshots: Mode) -> float:
    tmp = scratch(f"engine-{snapshots}-")  # kept until exit: see _scratch.py
    if snapshots == "off":
        settings = _settings(tmp, save_snapshots=False)
    elif snapshots == "flush-thread":  # the writer thread, as on a platform without the process
        settings = _settings(tmp, durability="flush", snapshot_writer="thread")
    else:
        settings = _settings(tmp, durability=snapshots)
    loop = NoOp(settings)
    started = time.perf_counter()
    summary = await loop.run(step_n=OVERHEAD_STEPS)
    seconds = time.perf_counter() - started
    assert summary.steps == OVERHEAD_STEPS, summary
    return OVERHEAD_STEPS / seconds


def _overhead() -> dict[tuple[str, Mode], float]:
    """Steps/s per backend and mode: every "flush" run before any "fsync" run, whose
    write-back would slow what follows."""
    rates = {}
    modes: tuple[Mode, ...] = ("off", "flush", "flush-thread", "fsync")
    for mode in modes:
        for backend in BACKENDS:
            rates[(backend, mode)] = _median(_repeat(_engine, backend, mode))
    return rates


def ideal_wall(loops: int, steps: int, step_s: float, limit: int) -> float:
    """Wall time of the engine's schedule with zero overhead.

    The kickoff runs each loop's first step, one loop after another, and admits a loop only
    while fewer than ``limit`` loops are unfinished; an admitted loop's other steps then run
    back to back. So even with unlimited parallelism the first steps take ``loops * step_s``.
    """
    kickoff_free = 0.0
    finish: list[float] = []
    for _ in range(loops):
        start = kickoff_free
        busy = sorted(f for f in finish if f > start)
        if len(busy) >= limit:
            start = busy[len(busy) - limit]
        kickoff_free = start + step_s
        finish.append(start + steps * step_s)
    return max(finish)


async def _step_time() -> float:
    """What one ``anyio.sleep(PAR_STEP_S)`` really takes here (timer slack, a busy machine)."""
    durations = []
    for _ in range(20):
        started = time.perf_counter()
        await anyio.sleep(PAR_STEP_S)
        durations.append(time.perf_counter() - started)
    return _median(durations)


async def _parallel(limit: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        loop = Sleepy(_settings(tmp, step_semaphore=limit, save_snapshots=False))
        started = time.perf_counter()
        summary = await loop.run(loop_n=PAR_LOOPS)
        seconds = time.perf_counter() - started
        assert summary.loops == PAR_LOOPS, summary
        return seconds


def _fresh_process(backend: str) -> tuple[float, float, float]:
    """A fresh interpreter running ``benchmarks/fresh_run.py``: seconds to import the engine,
    seconds in ``loop.run``, and the whole process's wall time, timed from outside."""
    begun = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.fresh_run", backend],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    wall = time.perf_counter() - begun
    imported, in_run = (float(x) for x in done.stdout.split())
    return imported, in_run, wall


async def _error_release() -> float:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:  # a few files only
        loop = FailsBesideSiblings(_settings(tmp, step_semaphore=4, durability="flush"))
        try:
            await loop.run(loop_n=4)
        except Boom:
            return time.perf_counter() - loop.raised_at
        raise AssertionError("the step error did not reach the caller")


async def _consumer(slow: bool) -> tuple[float, int]:
    """Read ``CONSUMED`` results, then leave; return the memory peak (MB) and the engine's lead.

    The lead is how many steps the engine had completed beyond what the consumer had read.
    """
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        loop = Producer(
            _settings(
                tmp, step_semaphore=CONSUMER_PARALLEL, save_snapshots=False, result_buffer=BUFFER
            )
        )
        lead = 0
        consumed = 0
        tracemalloc.start()
        try:
            handle = loop.run()  # no budget: the consumer decides when to stop
            async with handle as results:
                async for _ in results:
                    consumed += 1
                    lead = max(lead, handle.statistics().steps_completed - consumed)
                    if consumed >= CONSUMED:
                        break
                    if slow:
                        await anyio.sleep(CONSUMER_SLEEP_S)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return peak / 1e6, lead


async def _consumer_pair() -> tuple[float, float, int]:
    """Memory peaks (MB) of a fast and a slow consumer, and the engine's lead over the slow one."""
    fast, _ = await _consumer(slow=False)
    slow, lead = await _consumer(slow=True)
    return fast, slow, lead


# -- the table --------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def run() -> list[Row]:
    """Measure everything; return rows of (what, figure, bar)."""
    rows: list[Row] = []
    rates = _overhead()
    for backend in BACKENDS:
        tag = f"[{backend}]"

        floor = _median(_repeat(_floor, backend))
        rows.append(
            (
                f"{tag} floor: await {OVERHEAD_STEPS} no-op steps in a plain loop",
                f"{floor:,.0f} steps/s",
                "reference",
            )
        )
        for mode in ("off", "flush", "flush-thread", "fsync"):
            rate = rates[(backend, mode)]
            what = {
                "off": "no snapshots (save_snapshots=False)",
                "flush": 'snapshot after each step, durability="flush"',
                "flush-thread": 'the same, snapshot_writer="thread"',
                "fsync": 'snapshot after each step, durability="fsync"',
            }[mode]
            per_step = (1 / rate - 1 / floor) * 1e6
            figure = f"{rate:,.0f} steps/s ({per_step:,.0f} us/step over the floor"
            if mode == "off":
                rows.append(
                    (f"{tag} engine, {what}", figure + ")", "reference (engine cost alone)")
                )
            else:
                figure += f"; {rate / OLD_ENGINE_STEPS_PER_S:.1f}x the old engine's 404)"
                bar = {
                    "flush": f">= {OVERHEAD_BAR:,} steps/s: {_verdict(rate >= OVERHEAD_BAR)}",
                    "flush-thread": "reference (a thread of this process writes)",
                    "fsync": "reported (the bar is for flush, like the old engine's)",
                }[mode]
                rows.append((f"{tag} engine, {OVERHEAD_STEPS} no-op steps, {what}", figure, bar))

        step_s = _run(_step_time, backend)
        for limit in PAR_LIMITS:
            ideal = ideal_wall(PAR_LOOPS, PAR_STEPS, PAR_STEP_S, limit)
            wall = _median(_repeat(_parallel, backend, limit))
            ratio = wall / ideal
            # the same ideal with the step time measured just before: what is left is the engine
            calibrated = wall / ideal_wall(PAR_LOOPS, PAR_STEPS, step_s, limit)
            rows.append(
                (
                    f"{tag} {PAR_LOOPS} loops x {PAR_STEPS} async {PAR_STEP_S * 1000:.0f} ms "
                    f"steps, {limit} in flight",
                    f"{wall:.3f} s / ideal {ideal:.3f} s = {ratio:.3f} ({calibrated:.3f} with "
                    f"the {step_s * 1000:.1f} ms a sleep took)",
                    f"<= {PAR_BAR}: {_verdict(ratio <= PAR_BAR)}",
                )
            )

        fresh = [_fresh_process(backend) for _ in range(REPEATS)]
        imported, in_run, wall = (_median([f[i] for f in fresh]) for i in range(3))
        ideal = ideal_wall(PAR_LOOPS, PAR_STEPS, PAR_STEP_S, 4)
        rows.append(
            (
                f"{tag} the same at limit 4 as a fresh program (python -m benchmarks.fresh_run),"
                " default settings (snapshots, fsync)",
                f"loop.run {in_run:.3f} s = {in_run / ideal:.3f} x ideal; whole process "
                f"{wall:.3f} s = {wall / ideal:.3f} ({imported * 1000:.0f} ms importing "
                "rdagent_loop, most of it pydantic)",
                f"run <= {PAR_BAR}: {_verdict(in_run / ideal <= PAR_BAR)}; whole process: reported",
            )
        )

        release = _median(_repeat(_error_release, backend))
        rows.append(
            (
                f"{tag} a step error while 3 sibling steps wait {SIBLING_S:.0f} s",
                f"caller released {release * 1000:.1f} ms after the raise",
                f"<= {ERROR_BAR_S} s: {_verdict(release <= ERROR_BAR_S)}",
            )
        )

        pairs = _repeat(_consumer_pair, backend)
        ratio = _median([slow / fast for fast, slow, _ in pairs])
        fast_mb = _median([fast for fast, _, _ in pairs])
        slow_mb = _median([slow for _, slow, _ in pairs])
        lead = max(lead for _, _, lead in pairs)
        # results wait in the engine's queue (up to the buffer) and in the stream (the buffer),
        # plus one per step in flight or in hand: bounded by the buffer, not by the run
        bound = 2 * BUFFER + 2 * CONSUMER_PARALLEL
        rows.append(
            (
                f"{tag} slow consumer ({CONSUMER_SLEEP_S * 1000:.0f} ms/item, {CONSUMED} items of "
                f"{OUTPUT_BYTES // 1000} KB, result_buffer={BUFFER}): memory peak vs a fast one",
                f"{slow_mb:.1f} MB vs {fast_mb:.1f} MB = {ratio:.2f}; engine ahead by <= {lead}",
                f"<= {CONSUMER_BAR} and lead <= {bound}: "
                f"{_verdict(ratio <= CONSUMER_BAR and lead <= bound)}",
            )
        )
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table, so it pastes into a note as it is."""
    header = ("what", "figure", "bar")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    print(format_table(run()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
