"""The inline and thread executors, on asyncio and trio."""

from __future__ import annotations

import logging
import threading
import time

import anyio
import pytest
from executor_helpers import HANG, end_budget, settings_for

from rdagent_loop import LoopBase, step

pytestmark = pytest.mark.anyio


class StepFailed(Exception):
    pass


class Threaded(LoopBase):
    """``work`` runs in a thread; it counts how many of its calls overlap."""

    def __init__(self, settings, *, fail_loop=-1, seconds=0.0):
        super().__init__(settings)
        self.fail_loop = fail_loop
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    async def s0(self, prev_out):
        return threading.get_ident()

    @step(executor="thread")
    def work(self, prev_out):
        assert "s0" in prev_out
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.seconds)
            if prev_out[self.LOOP_IDX_KEY] == self.fail_loop:
                raise StepFailed("work failed", prev_out[self.LOOP_IDX_KEY])
            return threading.get_ident()
        finally:
            with self.lock:
                self.now -= 1

    def s2(self, prev_out):
        return threading.get_ident()

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("lock")
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.lock = threading.Lock()


async def test_thread_step_runs_off_the_event_loop_thread(tmp_path):
    loop = Threaded(settings_for(tmp_path))
    async with loop.run(loop_n=2) as results:
        outputs = {(r.loop_idx, r.step_name): r.output async for r in results}
    here = threading.get_ident()
    assert outputs[(0, "s0")] == outputs[(0, "s2")] == here  # async and last step: inline
    assert outputs[(0, "work")] != here
    assert outputs[(1, "work")] != here


async def test_thread_step_error_comes_back_as_itself(tmp_path):
    loop = Threaded(settings_for(tmp_path), fail_loop=1)
    with pytest.raises(StepFailed) as info:
        await loop.run(loop_n=3)
    assert info.value.args == ("work failed", 1)
    assert any("loop 1" in note and "'work'" in note for note in info.value.__notes__)


class Limited(Threaded):
    """``work`` waits inside until a second call is inside too: the limit of 2 is reached
    whatever the timing, and a third call at once would show as a peak of 3."""

    def __init__(self, settings):
        super().__init__(settings)
        self.pair = threading.Barrier(2)

    @step(executor="thread", limit=2)
    def work(self, prev_out):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            self.pair.wait(HANG)
        finally:
            with self.lock:
                self.now -= 1
        return threading.get_ident()

    def __getstate__(self):
        state = super().__getstate__()
        del state["pair"]
        return state


class Inline(Threaded):
    @step(executor="inline")
    def work(self, prev_out):
        return threading.get_ident()


async def test_thread_step_limit_is_respected(tmp_path):
    loop = Limited(settings_for(tmp_path, step_semaphore=4))
    summary = await loop.run(loop_n=6)
    assert summary.loops == 6
    assert loop.peak == 2


class Held(Threaded):
    """``work`` says it has started, then blocks until the test lets it go."""

    def __init__(self, settings):
        super().__init__(settings)
        self.started = threading.Event()
        self.release = threading.Event()

    @step(executor="thread")
    def work(self, prev_out):
        self.now += 1
        try:
            self.started.set()
            assert self.release.wait(HANG), "never released"
        finally:
            self.now -= 1

    def __getstate__(self):
        state = super().__getstate__()
        del state["started"], state["release"]
        return state


async def test_cancelled_thread_step_is_abandoned_with_a_warning(tmp_path, caplog):
    loop = Held(settings_for(tmp_path))
    caplog.set_level(logging.WARNING, logger="rdagent_loop")

    async def end_budget_once_started() -> None:
        while not loop.started.is_set():
            await anyio.sleep(0.01)
        end_budget(loop)

    try:
        with anyio.fail_after(HANG):
            async with anyio.create_task_group() as tg:
                tg.start_soon(end_budget_once_started)
                summary = await loop.run(loop_n=1, all_duration="1h")
        # the run returned while the thread was still held: it did not wait for it
        assert loop.now == 1
    finally:
        loop.release.set()
    assert summary.reason == "all_duration"
    warnings = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
    assert len(warnings) == 1
    assert "step 'work' of loop 0" in warnings[0]
    with anyio.fail_after(HANG):  # let the abandoned thread finish before the next test
        while loop.now:
            await anyio.sleep(0.01)


async def test_inline_sync_step_runs_on_the_event_loop_thread(tmp_path):
    async with Inline(settings_for(tmp_path, step_semaphore=2)).run(loop_n=1) as results:
        outputs = [r.output async for r in results]
    assert set(outputs) == {threading.get_ident()}
