"""One short program per run, as a user runs the engine: 20 loops x 5 async 50 ms steps,
limit 4, default settings (snapshots on, fsync), in a fresh interpreter.

    python -m benchmarks.fresh_run asyncio|trio

Prints one line: seconds from the interpreter's start to the import of the engine, and
from ``loop.run`` to its return (engine start-up included: executors, the snapshot writer).
``benchmarks.bench_engine`` times the whole process from outside and compares both with the
schedule's ideal.
"""

from __future__ import annotations

import sys
import tempfile
import time

started = time.perf_counter()

import anyio  # noqa: E402

from rdagent_loop import LoopBase, LoopSettings  # noqa: E402

imported = time.perf_counter()


class Sleepy(LoopBase):
    async def s0(self, prev_out: dict[str, object]) -> None:
        await anyio.sleep(0.05)

    async def s1(self, prev_out: dict[str, object]) -> None:
        await anyio.sleep(0.05)

    async def s2(self, prev_out: dict[str, object]) -> None:
        await anyio.sleep(0.05)

    async def s3(self, prev_out: dict[str, object]) -> None:
        await anyio.sleep(0.05)

    async def s4(self, prev_out: dict[str, object]) -> None:
        await anyio.sleep(0.05)


async def _timed(loop: Sleepy) -> float:
    begun = time.perf_counter()
    summary = await loop.run(loop_n=20)
    assert summary.loops == 20, summary
    return time.perf_counter() - begun


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
    with tempfile.TemporaryDirectory(prefix="bench-fresh-") as tmp:
        loop = Sleepy(LoopSettings(trace_path=tmp, step_semaphore=4, progress=False))
        seconds = anyio.run(_timed, loop, backend=backend)
    print(f"{imported - started:.6f} {seconds:.6f}")


if __name__ == "__main__":
    main()
