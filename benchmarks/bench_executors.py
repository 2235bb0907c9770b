"""Executor benchmarks (docs/benchmarks.md): the reused process pool, and stop latency.

``python -m benchmarks.bench_executors`` prints a table; ``run()`` returns its rows
``(what, figure, bar)`` for ``python -m benchmarks``.

* 200 short sync steps, 4 loops in parallel, a loop object carrying 10 MB of state: the
  reused pool against the old design (a new ``ProcessPoolExecutor`` per step, the loop object
  deep-copied into it), both driven by the same engine on asyncio;
* the same with 50 ms steps, against the ideal (200 x 50 ms / 4);
* stop latency at an ``all_duration`` deadline with 5 s steps in flight on each executor, and
  whether any process the steps started is left.

Machines are noisy: compare the ratios measured in one run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from benchmarks._scratch import scratch
from rdagent_loop import LoopBase, LoopSettings, step

Row = tuple[str, str, str]

LOOPS, STEPS, PARALLEL = 50, 4, 4  # 200 steps, 4 loops in flight
OLD_LOOPS = 15  # 60 steps of the old design: enough for its (constant) rate
STATE_MB = 10
SHORT_BAR = 5.0  # the reused pool is at least this many times faster than the old design
SLOW_STEP_S = 0.05
SLOW_BAR = 1.2  # wall <= this x ideal
STOP_STEP_S = 5.0
STOP_BAR_S = 0.1
REPEATS = 3


def make_state(megabytes: int, kind: str = "blob") -> Any:
    """10 MB of state, as the old engine's reference figure had it (``blob``: data held in memory,
    which pickles at memory speed), or as RD-Agent-like records (``records``: thousands of
    experiments with code and feedback text, which pickle object by object)."""
    if kind == "blob":
        return {"data": os.urandom(megabytes * 1_000_000), "notes": ["small"] * 100}
    code = "x = compute(data)  # generated code\n" * 100  # ~3.7 KB
    records = []
    size = 0
    while size < megabytes * 1_000_000:
        i = len(records)
        record = {
            "id": i,
            "code": code + str(i),
            "feedback": f"experiment {i}: " + "the score improved " * 20,
            "metrics": {"score": i / 7, "time": i * 0.1, "rank": i % 13},
            "tags": [f"tag{j}" for j in range(8)],
        }
        size += len(record["code"]) + len(record["feedback"]) + 300
        records.append(record)
    return records


class Heavy(LoopBase):
    """Four sync steps, every one on the process pool; ``self`` carries ``STATE_MB`` of state."""

    def __init__(self, settings: LoopSettings, seconds: float = 0.0, kind: str = "blob") -> None:
        super().__init__(settings)
        self.state = make_state(STATE_MB, kind)
        self.seconds = seconds

    def s0(self, prev_out: dict[str, Any]) -> int:
        return self._work(prev_out)

    def s1(self, prev_out: dict[str, Any]) -> int:
        return self._work(prev_out)

    def s2(self, prev_out: dict[str, Any]) -> int:
        return self._work(prev_out)

    def s3(self, prev_out: dict[str, Any]) -> int:
        return self._work(prev_out)

    def _work(self, prev_out: dict[str, Any]) -> int:
        if self.seconds:
            time.sleep(self.seconds)
        return len(prev_out) + len(self.state)


def _old_design_call(loop: LoopBase, name: str, prev_out: dict[str, Any]) -> Any:
    """What the engine we replace did for every sync step in parallel mode."""

    async def call() -> Any:
        func = copy.deepcopy(getattr(loop, name))  # the whole loop object, deep-copied
        with concurrent.futures.ProcessPoolExecutor() as pool:
            return await asyncio.get_running_loop().run_in_executor(pool, func, prev_out)

    return call()


class OldDesign(Heavy):
    """The same steps, each in a new ``ProcessPoolExecutor`` (asyncio only)."""

    async def s0(self, prev_out: dict[str, Any]) -> int:  # type: ignore[override]
        return await _old_design_call(self, "_work", prev_out)  # type: ignore[no-any-return]

    async def s1(self, prev_out: dict[str, Any]) -> int:  # type: ignore[override]
        return await _old_design_call(self, "_work", prev_out)  # type: ignore[no-any-return]

    async def s2(self, prev_out: dict[str, Any]) -> int:  # type: ignore[override]
        return await _old_design_call(self, "_work", prev_out)  # type: ignore[no-any-return]

    async def s3(self, prev_out: dict[str, Any]) -> int:  # type: ignore[override]
        return await _old_design_call(self, "_work", prev_out)  # type: ignore[no-any-return]


def _settings(folder: Path, **kwargs: Any) -> LoopSettings:
    return LoopSettings(
        trace_path=folder,
        progress=False,
        save_snapshots=False,
        step_semaphore=PARALLEL,
        **kwargs,
    )


def _timed_run(loop: LoopBase, backend: str, **run_kwargs: Any) -> float:
    async def main() -> None:
        await loop.run(**run_kwargs)

    started = time.perf_counter()
    anyio.run(main, backend=backend)
    return time.perf_counter() - started


def bench_short_steps(folder: Path) -> list[Row]:
    n = LOOPS * STEPS
    ours = statistics.median(
        _timed_run(Heavy(_settings(folder, step_executor="process")), "asyncio", loop_n=LOOPS)
        for _ in range(REPEATS)
    )
    # the old design costs the same for every step: time fewer of them, compare rates
    old = _timed_run(OldDesign(_settings(folder)), "asyncio", loop_n=OLD_LOOPS)
    old_rate, rate = OLD_LOOPS * STEPS / old, n / ours
    records = _timed_run(
        Heavy(_settings(folder, step_executor="process"), kind="records"),
        "asyncio",
        loop_n=OLD_LOOPS,
    )
    return [
        (
            f"{n} short sync steps, {PARALLEL} loops, {STATE_MB} MB state (blob): reused pool",
            f"{ours:.2f} s ({rate:.0f} steps/s, incl. starting {PARALLEL} workers)",
            "-",
        ),
        (
            "  the same, a new ProcessPoolExecutor per step + deepcopy (old design)",
            f"{old_rate:.1f} steps/s; the pool is {rate / old_rate:.1f}x faster",
            f">= {SHORT_BAR:g}x faster",
        ),
        (
            f"  the same, {STATE_MB} MB as 2,300 experiment records: reused pool",
            f"{OLD_LOOPS * STEPS / records:.0f} steps/s (pickling {STATE_MB} MB of objects)",
            "-",
        ),
    ]


def _pool_steady(backend: str) -> float:
    """The pool alone, started first: PARALLEL tasks each run LOOPS * STEPS / PARALLEL steps."""
    from rdagent_loop._executors._base import StepCall
    from rdagent_loop._executors._process import ProcessExecutor
    from rdagent_loop._steps import StepOptions

    loop = Heavy(_settings(scratch("pool-")), seconds=SLOW_STEP_S)  # no snapshots: a folder only
    wall = 0.0

    async def main() -> None:
        nonlocal wall
        pool = ProcessExecutor(PARALLEL)

        async def steps(li: int, count: int) -> None:
            for si in range(count):
                await pool.run(StepCall(li, si, "s1", loop.s1, {}, StepOptions()))

        try:
            async with anyio.create_task_group() as tg:  # start the workers
                for li in range(PARALLEL):
                    tg.start_soon(steps, li, 1)
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for li in range(PARALLEL):
                    tg.start_soon(steps, li, LOOPS * STEPS // PARALLEL)
            wall = time.perf_counter() - started
        finally:
            await pool.aclose()

    anyio.run(main, backend=backend)
    return wall


def bench_slow_steps(folder: Path) -> list[Row]:
    n = LOOPS * STEPS
    ideal = n * SLOW_STEP_S / PARALLEL
    rows = []
    for backend in ("asyncio", "trio"):
        steady = statistics.median(_pool_steady(backend) for _ in range(REPEATS))
        wall = _timed_run(  # one repeat: an informative row, and the budget is two minutes
            Heavy(_settings(folder, step_executor="process"), seconds=SLOW_STEP_S),
            backend,
            loop_n=LOOPS,
        )
        rows += [
            (
                f"{n} sync {SLOW_STEP_S * 1000:.0f} ms steps, {PARALLEL} at a time, {STATE_MB} MB "
                f"state, {backend}: the pool, started",
                f"{steady:.2f} s = {steady / ideal:.2f} x ideal ({ideal:.2f} s)",
                f"<= {SLOW_BAR:g} x ideal",
            ),
            (
                f"  the same as {LOOPS} loops of the engine, incl. starting the pool",
                f"{wall:.2f} s = {wall / ideal:.2f} x ideal",
                "-",
            ),
        ]
    return rows


class Stopping(LoopBase):
    """``s0`` is quick; ``block`` runs ``STOP_STEP_S`` on the executor under test."""

    def __init__(self, settings: LoopSettings, folder: Path) -> None:
        super().__init__(settings)
        self.folder = folder

    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    def block(self, prev_out: dict[str, Any]) -> int:
        (self.folder / f"pid-{prev_out[self.LOOP_IDX_KEY]}").write_text(str(os.getpid()))
        time.sleep(STOP_STEP_S)
        return 1

    def s2(self, prev_out: dict[str, Any]) -> int:
        return 2


class StoppingAsync(Stopping):
    async def block(self, prev_out: dict[str, Any]) -> int:  # type: ignore[override]
        (self.folder / f"pid-{prev_out[self.LOOP_IDX_KEY]}").write_text(str(os.getpid()))
        await anyio.sleep(STOP_STEP_S)
        return 1


class StoppingRay(Stopping):
    @step(executor="ray", num_cpus=0.5)
    def block(self, prev_out: dict[str, Any]) -> int:
        return super().block(prev_out)


def _run_until_deadline(loop: Stopping, backend: str, deadline: float) -> float:
    """Run until the ``all_duration`` deadline; return when ``run()`` returned (monotonic)."""
    returned = 0.0

    async def main() -> None:
        nonlocal returned
        await loop.run(loop_n=PARALLEL, all_duration=deadline)
        returned = time.monotonic()

    anyio.run(main, backend=backend)
    return returned


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.02)
    return False


def _stop_once(
    folder: Path, cls: type[Stopping], executor: str | None, backend: str, deadline: float
) -> tuple[float, int, bool]:
    """Seconds late, steps in flight at the deadline, and whether nothing was left running."""
    run_folder = Path(tempfile.mkdtemp(dir=folder))
    kwargs = {"step_executor": {"block": executor}} if executor else {}
    loop = cls(_settings(run_folder, **kwargs), run_folder)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    late = _run_until_deadline(loop, backend, deadline) - started - deadline
    pids = [int(p.read_text()) for p in run_folder.glob("pid-*")]
    if cls is StoppingRay:  # Ray's daemons (and the workers it starts anew) are its session's
        return late, len(pids), _gone(pids)
    own = pids if executor == "process" else []
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    return late, len(pids), _gone(own) and not left


def bench_stop_latency(folder: Path) -> list[Row]:
    # (label, loop class, executor, deadline: after the workers are up, repeats, barred)
    cases: list[tuple[str, type[Stopping], str | None, float, int, bool]] = [
        ("async", StoppingAsync, None, 1.0, REPEATS, True),
        ("thread", Stopping, "thread", 1.0, 1, False),
        ("process", Stopping, "process", 3.0, REPEATS, True),
    ]
    ray_session = _start_ray()
    if ray_session is not None:
        cases.append(("ray", StoppingRay, None, 4.0, 1, False))
    rows = []
    try:
        for label, cls, executor, deadline, repeats, barred in cases:
            for backend in ("asyncio", "trio"):
                runs = [
                    _stop_once(folder, cls, executor, backend, deadline) for _ in range(repeats)
                ]
                late = statistics.median(r[0] for r in runs)
                in_flight = min(r[1] for r in runs)
                clean = all(r[2] for r in runs)
                rows.append(
                    (
                        f"stop latency, {in_flight} x {STOP_STEP_S:g} s {label} steps, {backend}",
                        f"{late * 1000:.0f} ms late; "
                        + ("no process left" if clean else "PROCESSES LEFT"),
                        f"<= {STOP_BAR_S:g} s, nothing left" if barred else "-",
                    )
                )
    finally:
        if ray_session is not None:
            ray_session.shutdown()
    return rows


def _start_ray() -> Any:
    try:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray
    except ImportError:
        return None
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @ray.remote(num_cpus=0.5)
    def warm() -> int:
        import rdagent_loop  # noqa: F401  (what every step's worker imports first)

        return os.getpid()

    ray.get([warm.remote() for _ in range(PARALLEL)])  # start Ray's worker processes
    return ray


def run() -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        return bench_short_steps(folder) + bench_slow_steps(folder) + bench_stop_latency(folder)


def _format(rows: list[Row]) -> str:
    header = ("what", "figure", "bar")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)) + " |"]
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    print(_format(run()))


if __name__ == "__main__":
    main()
