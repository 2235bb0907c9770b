"""Snapshot costs (docs/benchmarks.md): flat per-step cost, flat disk, and durable-write overhead.

``python -m benchmarks.bench_snapshots`` prints a table; ``run()`` returns its rows
``(what, figure, bar)`` for ``python -m benchmarks``.

* per-step snapshot time and bytes at loop 10 and at loop 200, steps returning ~100 KB per
  loop: each snapshot is taken by the real engine and waited for (capture + write, until
  ``drain()`` returns);
* bytes on disk after 200 loops whose ``record`` adds 100 KB to ``self``, and a check that
  every snapshot is still loadable;
* steps/s of 2000 no-op steps with fsync'd, flushed and no snapshots.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, ClassVar

import anyio

from benchmarks._scratch import scratch
from rdagent_loop import LoopBase, LoopSettings, list_snapshots
from rdagent_loop._current import run_of
from rdagent_loop._session import SnapshotWriter

Row = tuple[str, str, str]

OUTPUT_PER_LOOP = 100_000
FLAT_LOOPS = 205  # measured at loops 5-14 and 195-204
DISK_LOOPS = 200
NOOP_STEPS = 2000
FSYNC_STEPS = 500


def _settings(trace: Path, **extra: Any) -> LoopSettings:
    return LoopSettings(trace_path=trace, progress=False, durability="flush", **extra)


# -- flat cost per step ------------------------------------------------------------------


class Outputs(LoopBase):
    """Four steps returning 25 KB each; every snapshot is timed until it is on disk: from the
    start of ``dump`` until the writer's ``drain()`` returns, awaited by the next step (so the
    engine's work between the two counts too; it does not grow as the run does)."""

    # (loop, seconds, bytes written); class attributes, so no snapshot carries them
    timings: ClassVar[list[tuple[int, float, int]]] = []
    timing: ClassVar[tuple[int, float, int] | None] = None  # the snapshot being timed

    async def propose(self, prev_out: dict[str, Any]) -> bytes:
        await self._written()
        return os.urandom(OUTPUT_PER_LOOP // 4)

    async def coding(self, prev_out: dict[str, Any]) -> bytes:
        await self._written()
        return os.urandom(OUTPUT_PER_LOOP // 4)

    async def running(self, prev_out: dict[str, Any]) -> bytes:
        await self._written()
        return os.urandom(OUTPUT_PER_LOOP // 4)

    async def record(self, prev_out: dict[str, Any]) -> bytes:
        await self._written()
        return os.urandom(OUTPUT_PER_LOOP // 4)

    def dump(self, path: str | Path) -> None:
        writer = _writer(self)
        before = writer.statistics().bytes_written if writer is not None else 0
        started = time.perf_counter()
        super().dump(path)
        Outputs.timing = (int(Path(path).parent.name), started, before)

    async def _written(self) -> None:
        """Stop the clock of the last snapshot once it is on disk."""
        timing, Outputs.timing = Outputs.timing, None
        writer = _writer(self)
        if timing is None or writer is None:
            return
        await writer.drain()
        loop_idx, started, before = timing
        seconds = time.perf_counter() - started
        self.timings.append((loop_idx, seconds, writer.statistics().bytes_written - before))


def _writer(loop: LoopBase) -> SnapshotWriter | None:
    run = run_of(loop)
    return None if run is None else run.writer


def flat_cost(root: Path) -> list[Row]:
    Outputs.timings, Outputs.timing = [], None
    loop = Outputs(_settings(root / "flat"))
    anyio.run(lambda: loop.run(loop_n=FLAT_LOOPS))
    early = [t for t in loop.timings if 5 <= t[0] < 15]
    late = [t for t in loop.timings if FLAT_LOOPS - 10 <= t[0] < FLAT_LOOPS]
    t_early = statistics.median(s for _, s, _ in early)
    t_late = statistics.median(s for _, s, _ in late)
    b_early = statistics.mean(b for *_, b in early)
    b_late = statistics.mean(b for *_, b in late)
    infos = list_snapshots(loop.session_folder)
    size_early = statistics.mean(i.state_size for i in infos if 5 <= i.loop_idx < 15)
    size_late = statistics.mean(i.state_size for i in infos if i.loop_idx >= FLAT_LOOPS - 10)
    return [
        (
            "snapshot time per step, loop ~10 vs ~200 (100 KB/loop)",
            f"{t_early * 1e3:.2f} ms vs {t_late * 1e3:.2f} ms: ratio {t_late / t_early:.2f}",
            "ratio <= 1.2 (old: 0.9 vs 52 ms)",
        ),
        (
            "bytes written per step, loop ~10 vs ~200",
            f"{b_early / 1e3:.1f} KB vs {b_late / 1e3:.1f} KB: ratio {b_late / b_early:.2f}",
            "ratio <= 1.2",
        ),
        (
            "pickled state per snapshot, loop ~10 vs ~200",
            f"{size_early / 1e3:.1f} KB vs {size_late / 1e3:.1f} KB: "
            f"ratio {size_late / size_early:.2f}",
            "ratio <= 1.2",
        ),
    ]


# -- flat disk --------------------------------------------------------------------------


class Grows(LoopBase):
    """``record`` adds 100 KB to ``self`` at every loop."""

    def __init__(self, settings: LoopSettings) -> None:
        super().__init__(settings)
        self.history: list[bytes] = []

    def propose(self, prev_out: dict[str, Any]) -> int:
        return len(self.history)

    def feedback(self, prev_out: dict[str, Any]) -> str:
        return f"loop {prev_out['propose']}"

    def record(self, prev_out: dict[str, Any]) -> None:
        self.history.append(os.urandom(100_000))


def _disk_usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def flat_disk(root: Path) -> list[Row]:
    loop = Grows(_settings(root / "disk"))
    started = time.perf_counter()
    anyio.run(lambda: loop.run(loop_n=DISK_LOOPS))
    seconds = time.perf_counter() - started
    usage = _disk_usage(loop.session_folder)
    infos = list_snapshots(loop.session_folder)
    valid = sum(i.valid for i in infos)
    # load a spread of snapshots in full (every chunk read and hashed, then unpickled)
    sample = [infos[0], infos[-1], *random.Random(0).sample(infos, 10)]
    for info in sample:
        restored = Grows.load(info.path)
        assert len(restored.history) == restored.step_idx[info.loop_idx] // 3 + info.loop_idx
    state = DISK_LOOPS * 100_000
    return [
        (
            f"disk after {DISK_LOOPS} loops adding 100 KB each to self",
            f"{usage / 1e6:.1f} MB for {len(infos)} snapshots ({state / 1e6:.0f} MB of state; "
            f"{seconds:.1f}s)",
            "< 100 MB (old: 10.0 GB)",
        ),
        (
            "  ... snapshots loadable",
            f"{valid}/{len(infos)} valid; {len(sample)} loaded in full",
            "all",
        ),
    ]


# -- durable writes ---------------------------------------------------------------------


class NoOp(LoopBase):
    def s0(self, prev_out: dict[str, Any]) -> None:
        return None

    def s1(self, prev_out: dict[str, Any]) -> None:
        return None

    def s2(self, prev_out: dict[str, Any]) -> None:
        return None

    def s3(self, prev_out: dict[str, Any]) -> None:
        return None

    def s4(self, prev_out: dict[str, Any]) -> None:
        return None


def _steps_per_second(mode: str, steps: int) -> float:
    trace = scratch(f"noop-{mode}-")  # a new folder each run, none deleted: see _scratch.py
    if mode == "none":
        settings = _settings(trace, save_snapshots=False)
    else:
        settings = _settings(trace).model_copy(update={"durability": mode})
    loop = NoOp(settings)
    started = time.perf_counter()
    summary = anyio.run(lambda: loop.run(step_n=steps))
    assert summary.steps == steps
    return steps / (time.perf_counter() - started)


def durability() -> list[Row]:
    rates: dict[str, list[float]] = {"none": [], "flush": []}
    for _ in range(3):
        for mode, found in rates.items():
            found.append(_steps_per_second(mode, NOOP_STEPS))
    median = {mode: statistics.median(found) for mode, found in rates.items()}
    median["fsync"] = _steps_per_second("fsync", FSYNC_STEPS)  # slow: once, fewer
    return [
        (
            f"{NOOP_STEPS} no-op steps, snapshots flushed",
            f"{median['flush']:,.0f} steps/s",
            ">= 2,000 steps/s (old: 404)",
        ),
        (
            f"{FSYNC_STEPS} no-op steps, snapshots fsync'd",
            f"{median['fsync']:,.0f} steps/s",
            "report",
        ),
        (
            f"{NOOP_STEPS} no-op steps, no snapshots",
            f"{median['none']:,.0f} steps/s (snapshots cost "
            f"{100 * (1 - median['flush'] / median['none']):.0f}% flushed, "
            f"{100 * (1 - median['fsync'] / median['none']):.0f}% fsync'd)",
            "report",
        ),
    ]


def run() -> list[Row]:
    root = scratch("snapshots-")
    return [*durability(), *flat_cost(root), *flat_disk(root)]


def main() -> None:
    rows = run()
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    print(line)


if __name__ == "__main__":
    main()
