"""The four ways to consume a run, and how each behaves when things go wrong."""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import gc
import re
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio
from looplib import Chain

from rdagent_loop import LoopBase, LoopSettings, RunSummary, StepResult
from rdagent_loop._outlet import DiscardOutlet

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


class Failing(LoopBase):
    """Loop 1's s1 raises while loop 0's s1 is still running."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.cancelled: list[int] = []

    async def s0(self, prev_out: dict[str, Any]) -> int:
        return int(prev_out[self.LOOP_IDX_KEY])

    async def s1(self, prev_out: dict[str, Any]) -> None:
        li = prev_out[self.LOOP_IDX_KEY]
        if li == 1:
            raise Boom("loop 1 failed")
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(li)
            raise


def parallel(settings: LoopSettings, n: int = 2) -> LoopSettings:
    return settings.model_copy(update={"step_semaphore": n})


def test_the_handle_is_a_real_coroutine(settings: LoopSettings) -> None:
    handle = Chain(settings).run(loop_n=1)
    assert isinstance(handle, collections.abc.Coroutine)
    handle.close()  # never awaited: nothing to warn about


def test_asyncio_run_accepts_the_handle(settings: LoopSettings) -> None:
    summary = asyncio.run(Chain(settings).run(step_n=10, loop_n=2, all_duration="2h"))
    assert summary == RunSummary(steps=8, loops=2, reason="loop_n")


def test_trio_run_accepts_the_run_method(settings: LoopSettings) -> None:
    loop = Chain(settings)
    summary = trio.run(loop.run, 6)  # step_n=6
    assert summary == RunSummary(steps=6, loops=1, reason="step_n")
    assert loop.step_idx[1] == 2


async def test_await_returns_a_frozen_summary(settings: LoopSettings) -> None:
    summary = await Chain(settings).run(loop_n=3)
    assert summary == RunSummary(steps=12, loops=3, reason="loop_n")
    with pytest.raises(AttributeError):
        summary.steps = 1  # type: ignore[misc]


async def test_await_queues_no_results_since_nobody_reads_them(settings: LoopSettings) -> None:
    handle = Chain(settings).run(loop_n=3)
    assert await handle == RunSummary(steps=12, loops=3, reason="loop_n")
    assert handle._run is not None
    assert isinstance(handle._run.outlet, DiscardOutlet)  # no stream: nothing per step
    assert handle.statistics().results_pending == 0
    streamed = Chain(settings).run(loop_n=1)
    async with streamed as results:
        assert streamed._run is not None
        assert not isinstance(streamed._run.outlet, DiscardOutlet)
        assert len([r async for r in results]) == 4


async def test_async_with_streams_results_of_each_loop_in_step_order(
    settings: LoopSettings,
) -> None:
    seen: list[StepResult] = []
    async with Chain(parallel(settings, 3)).run(loop_n=4) as results:
        async for result in results:
            seen.append(result)
    assert results.summary == RunSummary(steps=16, loops=4, reason="loop_n")
    for li in range(4):
        mine = [r for r in seen if r.loop_idx == li]
        assert [r.step_name for r in mine] == ["s0", "s1", "s2", "s3"]
        assert [r.output for r in mine] == [f"{s}@{li}" for s in ("s0", "s1", "s2", "s3")]
        assert all(r.exception is None and r.started_at.tzinfo is not None for r in mine)
        assert all(r.started_at <= r.ended_at for r in mine)
    assert "loop 0 step 0 s0" in str(seen[0])


async def test_bare_async_for_streams_every_result(settings: LoopSettings) -> None:
    iterator = aiter(Chain(settings).run(loop_n=2))
    names = [r.step_name async for r in iterator]
    assert names == ["s0", "s1", "s2", "s3"] * 2
    assert iterator.summary == RunSummary(steps=8, loops=2, reason="loop_n")  # type: ignore[attr-defined]


async def test_a_handle_is_consumed_once(settings: LoopSettings) -> None:
    handle = Chain(settings).run(loop_n=1)
    await handle
    with pytest.raises(RuntimeError, match="already consumed"):
        async with handle:
            pass


async def test_one_run_at_a_time_per_loop_object(settings: LoopSettings) -> None:
    loop = Chain(settings, delay=0.05)
    async with loop.run(loop_n=1) as results:
        with pytest.raises(RuntimeError, match="already running"):
            await loop.run(loop_n=1)
        async for _ in results:
            pass


# -- errors reach the caller as themselves, in every form ---------------------------------


async def test_await_raises_the_step_error_itself_with_a_note(settings: LoopSettings) -> None:
    loop = Failing(parallel(settings))
    with pytest.raises(Boom) as info:
        await loop.run(loop_n=2)
    assert type(info.value) is Boom
    assert any("loop 1" in note and "'s1'" in note for note in info.value.__notes__)
    assert loop.cancelled == [0]  # the sibling step was cancelled, not left running
    assert loop.step_idx[1] == 1  # the failed step is not marked done


async def test_async_with_raises_the_step_error_from_the_iteration(
    settings: LoopSettings,
) -> None:
    loop = Failing(parallel(settings))
    received: list[StepResult] = []
    with pytest.raises(Boom):
        async with loop.run(loop_n=2) as results:
            async for result in results:
                received.append(result)
    # what completed before the error is delivered before it
    assert [(r.loop_idx, r.step_name) for r in received] == [(0, "s0"), (1, "s0")]
    assert loop.cancelled == [0]


async def test_bare_async_for_raises_the_step_error_from_anext(settings: LoopSettings) -> None:
    loop = Failing(parallel(settings))
    with pytest.raises(Boom) as info:
        async for _ in loop.run(loop_n=2):
            pass
    assert type(info.value) is Boom
    await wait_until_stopped(loop)
    assert loop.cancelled == [0]


# -- a consumer that leaves early ----------------------------------------------------------


HANG = 30  # seconds: a bound only a hang reaches, however slow the machine


async def wait_until_stopped(loop: LoopBase, timeout: float = HANG) -> None:
    with anyio.fail_after(timeout):
        while loop._running:
            await anyio.sleep(0.01)


async def assert_nothing_runs_any_more(loop: Chain, executed_when_left: int) -> None:
    """The engine stops promptly: once the consumer has left, no step starts any more, and of
    those in flight (at most ``step_semaphore``, 4 here) none goes past its current await.
    Counted in steps, not seconds, so a slow machine changes nothing."""
    await wait_until_stopped(loop)
    executed = len(loop.executed)
    assert executed - executed_when_left <= 4
    await anyio.sleep(0.3)
    assert len(loop.executed) == executed


async def test_break_stops_the_engine_promptly(settings: LoopSettings) -> None:
    loop = Chain(parallel(settings, 4), delay=0.01)
    async for result in loop.run():
        if result.loop_idx == 2:
            break
    await assert_nothing_runs_any_more(loop, len(loop.executed))


async def test_break_while_awaiting_between_items(settings: LoopSettings) -> None:
    loop = Chain(parallel(settings, 4), delay=0.01)
    count = 0
    async for _ in loop.run():
        await anyio.sleep(0.02)  # the consumer's own awaits see no engine cancellation
        count += 1
        if count == 5:
            break
    left = len(loop.executed)
    await anyio.sleep(0.01)
    await assert_nothing_runs_any_more(loop, left)


async def test_the_consumers_own_exception_propagates_unwrapped(settings: LoopSettings) -> None:
    loop = Chain(parallel(settings, 4), delay=0.01)
    with pytest.raises(KeyError) as info:
        async for _ in loop.run():
            raise KeyError("mine")
    assert type(info.value) is KeyError
    await assert_nothing_runs_any_more(loop, len(loop.executed))


async def test_outside_cancellation_of_a_bare_async_for(settings: LoopSettings) -> None:
    loop = Chain(parallel(settings, 4), delay=0.01)
    with anyio.move_on_after(0.2) as scope:
        async for _ in loop.run():
            pass
    assert scope.cancelled_caught
    await assert_nothing_runs_any_more(loop, len(loop.executed))


async def test_outside_cancellation_of_async_with(settings: LoopSettings) -> None:
    loop = Chain(parallel(settings, 4), delay=0.01)
    with anyio.move_on_after(0.2) as scope:
        async with loop.run() as results:
            async for _ in results:
                pass
    assert scope.cancelled_caught
    assert not loop._running  # structured: nothing outlives the block
    executed = len(loop.executed)
    await anyio.sleep(0.2)
    assert len(loop.executed) == executed


async def test_leaving_async_with_early_stops_everything_before_the_block_ends(
    settings: LoopSettings,
) -> None:
    loop = Chain(parallel(settings, 4), delay=0.01)
    async with loop.run() as results:
        async for result in results:
            if result.loop_idx == 3:
                break
    assert not loop._running
    executed = len(loop.executed)
    await anyio.sleep(0.2)
    assert len(loop.executed) == executed


async def test_a_dropped_iterator_that_was_never_started_leaves_nothing(
    settings: LoopSettings,
) -> None:
    iterator = aiter(Chain(settings).run(loop_n=1))
    del iterator
    await anyio.lowlevel.checkpoint()


async def test_explicit_aclose_waits_for_the_engine(settings: LoopSettings) -> None:
    loop = Chain(parallel(settings, 2), delay=0.01)
    iterator = aiter(loop.run())
    await anext(iterator)
    await iterator.aclose()  # type: ignore[attr-defined]
    assert not loop._running


# -- a handle nobody consumes --------------------------------------------------------------


@contextlib.contextmanager
def no_unused_handle_warning() -> Iterator[None]:
    """Record (rather than raise) warnings while handles die, and assert none was "unused"."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_a_handle_dropped_unused_warns_naming_the_call(settings: LoopSettings) -> None:
    loop = Chain(settings)
    handle = loop.run(step_n=3)  # RD-Agent's kaggle app: kaggle_loop.run(step_n=step_n)
    handle_ref = weakref.ref(handle)
    gc.disable()  # no cycle keeps it alive: it goes, and warns, as soon as it is dropped
    try:
        message = "Chain.run(step_n=3) was never awaited, entered or iterated: nothing ran"
        with pytest.warns(RuntimeWarning, match=re.escape(message)) as caught:
            del handle
        assert handle_ref() is None
    finally:
        gc.enable()
    assert caught[0].filename == __file__  # points at the line that dropped it
    assert loop.executed == [] and not loop.session_folder.exists()


def test_an_unused_temporary_handle_warns_at_once(settings: LoopSettings) -> None:
    with pytest.warns(RuntimeWarning, match=r"Chain\.run\(loop_n=2\) was never awaited"):
        Chain(settings).run(loop_n=2)


async def _await(handle: Any) -> None:
    await handle


async def _async_with(handle: Any) -> None:
    async with handle as results:
        async for _ in results:
            pass


async def _async_for(handle: Any) -> None:
    async for _ in handle:
        pass


async def _await_cancelled_at_once(handle: Any) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await handle


@pytest.mark.parametrize(
    "consume",
    [_await, _async_with, _async_for, _await_cancelled_at_once],
    ids=["await", "async-with", "async-for", "await-cancelled"],
)
async def test_a_consumed_handle_goes_silently(settings: LoopSettings, consume: Any) -> None:
    handle = Chain(settings).run(loop_n=1)
    await consume(handle)
    with no_unused_handle_warning():
        del handle


async def test_a_handle_refused_because_the_loop_runs_goes_silently(
    settings: LoopSettings,
) -> None:
    loop = Chain(settings, delay=0.05)
    async with loop.run(loop_n=1) as results:
        for form in (_await, _async_with, _async_for):
            handle = loop.run(loop_n=1)
            with pytest.raises(RuntimeError, match="already running"):
                await form(handle)
            with no_unused_handle_warning():
                del handle
        async for _ in results:
            pass


def test_a_handle_asyncio_cancels_before_it_starts_goes_silently(settings: LoopSettings) -> None:
    async def main() -> None:
        task = asyncio.create_task(Chain(settings).run(loop_n=1))  # type: ignore[arg-type]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with no_unused_handle_warning():
        asyncio.run(main())


def test_a_handle_trio_cancels_before_it_starts_goes_silently(settings: LoopSettings) -> None:
    async def main() -> None:
        handle = Chain(settings).run(loop_n=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: handle)
            nursery.cancel_scope.cancel()

    with no_unused_handle_warning():
        trio.run(main)
