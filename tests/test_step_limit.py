"""StepLimit: a step slot taken at once when free, waited for in order when not.

Tests that order tasks by sleeping run on a virtual clock, so the order holds on a busy machine.
"""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
from looplib import virtual_clock_params

from rdagent_loop._step_limit import StepLimit

pytestmark = pytest.mark.anyio


async def test_a_free_slot_yields_once_and_a_cancelled_taker_gives_it_back() -> None:
    limit = StepLimit(2)
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with limit:  # the cancellation lands at its one checkpoint
            pytest.fail("entered a cancelled scope")
    assert scope.cancelled_caught
    assert limit._semaphore.value == 2
    async with limit:
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
            async with limit:  # each one yields: the other task is not starved
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
        async with limit:
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
            async with limit:
                pytest.fail("got a slot that was held")

    async with limit, anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.01)
        waiting.cancel()
    assert limit._semaphore.value == 1
