"""Failure scenarios 10, 18, 19, 20 and 24 of SCENARIOS.md, on asyncio and trio.

Real processes and threads run here, so no test measures how fast they are: a test waits for a
file a step writes when it has started, and ends the ``all_duration`` budget then (see
``run_until_written``); bounds in seconds only guard against a hang.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from executor_helpers import (
    HANG,
    LONG,
    await_file,
    await_gone,
    is_gone,
    run_until_written,
    settings_for,
    wait_for_file,
)

from rdagent_loop import LoopBase, step

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_child_left")]


# -- 10: termination kills step jobs -------------------------------------------------------


class Jobs(LoopBase):
    """Loop 0's ``run_job`` starts a long job process and waits for it; loop 1's is quick."""

    def __init__(self, settings, folder: Path):
        super().__init__(settings)
        self.folder = folder

    def s0(self, prev_out):
        return 0

    def run_job(self, prev_out):
        if prev_out[self.LOOP_IDX_KEY] == 0:
            job = subprocess.Popen(["sleep", str(LONG)])
            (self.folder / "job").write_text(f"{os.getpid()} {job.pid}")
            return job.wait()
        return 0

    def s2(self, prev_out):
        return 2


async def test_termination_kills_step_jobs(tmp_path):
    loop = Jobs(settings_for(tmp_path, step_semaphore=2), tmp_path)
    # the budget runs out once the job has started; the run returning long before the job
    # would end (LONG) shows it did not wait for it
    with anyio.fail_after(HANG):
        summary = await run_until_written(loop, [tmp_path / "job"])
    assert summary.reason == "all_duration"
    worker, job = map(int, (await await_file(tmp_path / "job")).split())
    assert not await await_gone([worker, job])


# -- 18: sync steps do not block other loops -----------------------------------------------


class Blocking(LoopBase):
    """``block`` says it has started, then blocks until the event loop answers it: it can only
    finish if the event loop runs while it blocks."""

    def __init__(self, settings, folder: Path):
        super().__init__(settings)
        self.folder = folder

    async def s0(self, prev_out):
        return 0

    def block(self, prev_out):
        li = prev_out[self.LOOP_IDX_KEY]
        (self.folder / f"started-{li}").write_text("started")
        wait_for_file(self.folder / f"answer-{li}")  # raises after HANG: nobody answered
        return 1

    async def s2(self, prev_out):
        return 2


@pytest.mark.parametrize("kind", ["thread", "process"])
async def test_sync_steps_do_not_block_other_loops(tmp_path, kind):
    settings = settings_for(tmp_path, step_semaphore=2, step_executor={"block": kind})
    loop = Blocking(settings, tmp_path)

    async def answer(li: int) -> None:
        # runs on the event loop while loop li's ``block`` step blocks
        await await_file(tmp_path / f"started-{li}")
        await anyio.to_thread.run_sync((tmp_path / f"answer-{li}").write_text, "go on")

    async with anyio.create_task_group() as tg:
        for li in range(2):
            tg.start_soon(answer, li)
        summary = await loop.run(loop_n=2)
    assert summary.loops == 2


class Sleepy(LoopBase):
    async def s0(self, prev_out):
        return 0

    def block(self, prev_out):
        time.sleep(0.8)
        return 1

    async def s2(self, prev_out):
        return 2


async def test_inline_sync_steps_block_by_choice(tmp_path):
    """An inline step blocks the event loop for as long as it runs: a ticker that wakes every
    10 ms misses at least the step's 0.8 s (a lower bound, which a slow machine only raises)."""
    loop = Sleepy(settings_for(tmp_path, step_semaphore=2, step_executor={"block": "inline"}))
    pauses = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            pauses.append(now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await loop.run(loop_n=2)
        tg.cancel_scope.cancel()
    assert max(pauses) > 0.7


# -- 19: process steps leave unrelated processes alone -------------------------------------


class Sleeper(Jobs):
    def run_job(self, prev_out):
        (self.folder / f"worker-{prev_out[self.LOOP_IDX_KEY]}").write_text(str(os.getpid()))
        time.sleep(LONG)


async def test_process_steps_leave_the_applications_own_children_alone(tmp_path):
    own = await anyio.open_process(["sleep", str(LONG)])  # the application's own helper
    try:
        loop = Sleeper(settings_for(tmp_path, step_semaphore=2), tmp_path)
        files = [tmp_path / "worker-0", tmp_path / "worker-1"]
        with anyio.fail_after(HANG):
            summary = await run_until_written(loop, files, loop_n=2)
        assert summary.reason == "all_duration"
        workers = [int(await await_file(file)) for file in files]
        assert len(set(workers)) == 2
        assert not await await_gone(workers)
        assert not await anyio.to_thread.run_sync(is_gone, own.pid)  # still running
    finally:
        own.kill()
        await own.wait()


# -- 20: mutations in process steps ---------------------------------------------------------


class Mutator(LoopBase):
    def __init__(self, settings):
        super().__init__(settings)
        self.seen: list[int] = []

    def s0(self, prev_out):
        return 0

    def mutate(self, prev_out):
        self.seen.append(prev_out[self.LOOP_IDX_KEY])  # lands in the worker's copy only
        return len(self.seen)

    def record(self, prev_out):
        self.seen.append(-1)  # inline: this one stays
        return prev_out["mutate"]


async def test_process_step_mutations_do_not_come_back_only_the_result_does(tmp_path):
    loop = Mutator(settings_for(tmp_path, step_semaphore=2))
    async with loop.run(loop_n=3) as results:
        outputs = {(r.loop_idx, r.step_name): r.output async for r in results}
    assert loop.seen == [-1, -1, -1]
    for li in range(3):
        # the copy shipped with the step had the records of earlier loops, plus its own append
        assert outputs[(li, "mutate")] == outputs[(li, "record")]
        assert outputs[(li, "mutate")] >= 1


# -- 24: no race between saving, shipping and steps ----------------------------------------


class Slow:
    """Pickles through Python code, so a pickler running beside a mutation would notice."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (Slow, (self.n,))


BURST = 20  # keys added, then removed, at a time


class Churn(LoopBase):
    def __init__(self, settings):
        super().__init__(settings)
        self.objects = {i: Slow(i) for i in range(10_000)}

    def s0(self, prev_out):
        return 0

    async def churn(self, prev_out):
        n = 0
        deadline = time.monotonic() + 0.3
        while n == 0 or time.monotonic() < deadline:  # at least once, however slow
            self._grow_and_shrink(prev_out[self.LOOP_IDX_KEY], n)
            await anyio.lowlevel.checkpoint()
            n += 1
        return n

    def _grow_and_shrink(self, li, n):
        keys = [(li, n % 50, k) for k in range(BURST)]
        for key in keys:
            self.objects[key] = Slow(key)
        for key in keys:
            del self.objects[key]

    def ship(self, prev_out):
        return len(self.objects)

    def record(self, prev_out):
        return prev_out["ship"]


class ThreadChurn(Churn):
    @step(executor="thread")
    def churn(self, prev_out):
        n = 0
        deadline = time.monotonic() + 0.3
        # no pause at all: only the engine can hold it off; at least once, however slow
        while n == 0 or time.monotonic() < deadline:
            self._grow_and_shrink(prev_out[self.LOOP_IDX_KEY], n)
            n += 1
        return n


@pytest.mark.parametrize("cls", [Churn, ThreadChurn], ids=["async-step", "thread-step"])
async def test_no_race_between_saving_shipping_and_steps(tmp_path, cls):
    loop = cls(settings_for(tmp_path, step_semaphore=3))
    async with loop.run(loop_n=4) as results:
        outputs = {(r.loop_idx, r.step_name): r.output async for r in results}
    assert all(outputs[(li, "churn")] > 0 for li in range(4))
    # a copy may hold keys a thread step had just added (one burst per loop at most)
    assert all(10_000 <= outputs[(li, "ship")] <= 10_000 + 3 * BURST for li in range(4))
