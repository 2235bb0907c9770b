"""A plain trio application embedding the engine in its own nursery (pytest-trio)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from looplib import Chain

from rdagent_loop import LoopSettings, StepResult


def make_settings(tmp_path: Path, parallel: int = 2) -> LoopSettings:
    return LoopSettings(trace_path=tmp_path, step_semaphore=parallel, progress=False)


@pytest.mark.trio
async def test_a_trio_app_runs_the_engine_beside_its_own_tasks(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # on a virtual clock the heartbeat ticks every 1 ms while the engine's 10 ms steps run
    # (60 ms at least), however busy the machine is
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.001)

    nursery.start_soon(heartbeat)
    send, receive = trio.open_memory_channel[StepResult](0)

    async def engine() -> None:
        async with send, Chain(make_settings(tmp_path), delay=0.01).run(loop_n=3) as results:
            async for result in results:
                await send.send(result)

    nursery.start_soon(engine)
    seen = [result.step_name async for result in receive]
    assert len(seen) == 12
    assert ticks > 10  # the app's own task kept running while the engine worked


@pytest.mark.trio
async def test_cancelling_the_apps_nursery_stops_the_engine(tmp_path: Path) -> None:
    loop = Chain(make_settings(tmp_path, 4), delay=0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(loop.run)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert not loop._running
    done = len(loop.executed)
    await trio.sleep(0.1)
    assert len(loop.executed) == done


@pytest.mark.trio
async def test_a_trio_app_uses_the_bare_async_for_form(tmp_path: Path) -> None:
    loop = Chain(make_settings(tmp_path, 4), delay=0.01)
    with trio.move_on_after(5):
        async for result in loop.run():
            if result.loop_idx == 2:
                break
    with trio.fail_after(30):  # only a hang reaches this, however slow the machine
        while loop._running:
            await trio.sleep(0.01)
