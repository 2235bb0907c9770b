"""StepLimit: a step slot taken at once when free, waited for in order when not.

Tests that order tasks by sleeping run on a virtual clock, so the order holds on a busy machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import pytest
from looplib import virtual_clock_params

from rdagent_loop._step_limit import StepLimit, StepSlot

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def held(limit: StepLimit) -> AsyncIterator[StepSlot]:
    """A slot for the block, as the engine holds one for a step."""
    slot = await limit.take()
    try:
        yield slot
    finally:
        slot.release()


async def test_a_free_slot_yields_once_and_a_cancelled_taker_gives_it_back() -> None:
    limit = StepLimit(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with held(limit):  # the cancellation lands at its one checkpoint
            pytest.fail("entered a cancelled scope")
    assert scope.cancelled_caught
    assert limit._semaphore.value == 2
    async with held(limit):
        assert limit._semaphore.value == 1
    assert limit._semaphore.value == 2


async def test_other_tasks_run_while_free_slots_are_taken() -> None:
    limit = StepLimit(1)
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        for _ in range(100):
            async with held(limit):  # each one yields: the other task is not starved
                pass
        seen = ticks
        tg.cancel_scope.cancel()
    assert seen > 10


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_a_busy_slot_is_waited_for_in_order_and_never_exceeded() -> None:
    limit = StepLimit(2)
    inside = peak = 0
    order: list[int] = []

    async def step(n: int) -> None:
        nonlocal inside, peak
        async with held(limit):
            order.append(n)
            inside += 1
            peak = max(peak, inside)
            await anyio.sleep(0.05)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(step, n)
            await anyio.sleep(0.01)  # each reaches the limit before the next starts
    assert peak == 2
    assert order == list(range(6))
    assert limit._semaphore.value == 2


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_a_waiter_cancelled_in_the_queue_takes_no_slot() -> None:
    limit = StepLimit(1)
    waiting = anyio.CancelScope()

    async def wait() -> None:
        with waiting:
            async with held(limit):
                pytest.fail("got a slot that was held")

    async with held(limit), anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.01)
        waiting.cancel()
    assert limit._semaphore.value == 1


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_a_slot_handed_back_while_waiting_goes_to_another_step_and_comes_back() -> None:
    """What a step waiting for an answer does: release, a sibling runs, retake; releasing
    twice (the engine's own release at the end) gives back only what is held."""
    limit = StepLimit(1)
    order: list[str] = []

    async def sibling() -> None:
        async with held(limit):
            order.append("sibling")
            await anyio.sleep(1)

    async with anyio.create_task_group() as tg:
        slot = await limit.take()
        tg.start_soon(sibling)
        await anyio.sleep(0.5)
        assert order == []  # the slot is held
        slot.release()
        slot.release()  # idempotent
        await anyio.sleep(0.5)
        assert order == ["sibling"]
        await slot.retake()  # waits for the sibling to finish
        assert slot.held
        assert limit._semaphore.value == 0
        slot.release()
    assert limit._semaphore.value == 1
