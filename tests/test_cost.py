"""Cost budgets (DESIGN §3.3), on asyncio and trio: ``loop.charge`` from every executor,
``StepResult``/``RunSummary`` cost and tokens, ``run(all_cost=...)`` stopping a run as the
deadline does, the amount spent carried by the session, and memoized calls charged once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest
from looplib import virtual_clock_params

from rdagent_loop import LoopBase, LoopSettings, StepResult, step

pytestmark = pytest.mark.anyio


class Paying(LoopBase):
    """Every step charges 1.0 and 10 tokens, then works for ``work`` seconds."""

    work = 1.0

    async def propose(self, prev_out: dict[str, Any]) -> Any:
        self.charge(1.0, tokens=10)
        await anyio.sleep(self.work)
        return "idea"

    async def coding(self, prev_out: dict[str, Any]) -> Any:
        self.charge(1.0, tokens=10)
        await anyio.sleep(self.work)
        return "code"


class EveryExecutor(LoopBase):
    """One step per executor, each charging what its name says."""

    async def on_async(self, prev_out: dict[str, Any]) -> Any:
        self.charge(1.0, tokens=1)
        return "async"

    @step(executor="inline")
    def on_inline(self, prev_out: dict[str, Any]) -> Any:
        self.charge(2.0, tokens=2)
        return "inline"

    @step(executor="thread")
    def on_thread(self, prev_out: dict[str, Any]) -> Any:
        self.charge(4.0, tokens=4)
        return "thread"

    @step(executor="process")
    def on_process(self, prev_out: dict[str, Any]) -> Any:
        self.charge(8.0, tokens=8)
        return "process"


async def test_charges_from_every_executor_add_up(settings: LoopSettings) -> None:
    loop = EveryExecutor(settings=settings)
    async with loop.run(loop_n=2) as results:
        items = [r async for r in results]
    costs = {(r.loop_idx, r.step_name): (r.cost, r.tokens) for r in items}
    assert costs[(1, "on_async")] == (1.0, 1)
    assert costs[(1, "on_inline")] == (2.0, 2)
    assert costs[(1, "on_thread")] == (4.0, 4)
    assert costs[(1, "on_process")] == (8.0, 8)
    summary = results.summary
    assert summary is not None
    assert (summary.cost, summary.tokens) == (30.0, 30)
    assert (loop.spending.cost, loop.spending.tokens) == (30.0, 30)
    trace = loop.loop_trace[0][3]
    assert (trace.step_name, trace.cost, trace.tokens) == ("on_process", 8.0, 8)
    assert "(cost 8)" in str(costs and items[-1])


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_all_cost_stops_the_run_once_reached(settings: LoopSettings) -> None:
    """Steps one at a time, 1.0 each: the third charge reaches 3.0, and the step that made
    it is cancelled at its next await, as at the deadline; no step starts after it."""
    settings = settings.model_copy(update={"save_snapshots": False})
    loop = Paying(settings=settings)
    started = anyio.current_time()
    async with loop.run(loop_n=10, all_cost=3) as results:
        items = [r async for r in results]
    assert [(r.loop_idx, r.step_name) for r in items] == [(0, "propose"), (0, "coding")]
    summary = results.summary
    assert summary is not None and summary.reason == "all_cost"
    assert summary.cost == 3.0 and summary.tokens == 30  # the cancelled step spent too
    assert anyio.current_time() - started == pytest.approx(2, abs=0.01)


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_the_grace_period_lets_steps_in_flight_finish(settings: LoopSettings) -> None:
    settings = settings.model_copy(
        update={"save_snapshots": False, "grace_period": 5.0, "step_semaphore": 3}
    )
    loop = Paying(settings=settings)
    async with loop.run(loop_n=3, all_cost=2) as results:
        items = [r async for r in results]
    # loops 0 and 1 proposed (2.0 reached at the second charge); both may finish their
    # step within the grace period, and no coding step starts
    assert sorted((r.loop_idx, r.step_name) for r in items) == [(0, "propose"), (1, "propose")]
    assert results.summary is not None and results.summary.reason == "all_cost"


async def test_what_was_spent_travels_with_the_session(settings: LoopSettings) -> None:
    loop = Paying(settings=settings)
    loop.work = 0
    summary = await loop.run(loop_n=1, all_cost=5)
    assert summary.reason == "loop_n" and summary.cost == 2.0

    resumed = Paying.load(settings.trace_path)
    resumed.work = 0
    assert (resumed.spending.cost, resumed.spending.limit) == (2.0, 5.0)
    summary = await resumed.run(loop_n=5)  # the saved budget, not a fresh allowance
    assert summary.reason == "all_cost"
    assert resumed.spending.cost == 5.0 and summary.cost == 3.0

    again = Paying.load(settings.trace_path)
    summary = await again.run(loop_n=5)
    assert summary.reason == "all_cost" and summary.steps == 0
    summary = await again.run(loop_n=1, all_cost=7)  # a new budget, counted from 5.0
    assert again.spending.cost == 7.0


class MemoCharges(LoopBase):
    """``think`` charges inside a memoized call, then fails its first attempt."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attempts = 0
        self.calls = 0

    def _model(self) -> str:
        self.calls += 1
        self.charge(2.5, tokens=100)
        return "answer"

    @step(retries=1, backoff=0.01)
    async def think(self, prev_out: dict[str, Any]) -> Any:
        value = await self.memo("model", self._model)
        self.attempts += 1
        if self.attempts == 1:
            raise ConnectionError("lost")
        return value


async def test_a_replayed_memo_is_not_charged_again(settings: LoopSettings) -> None:
    loop = MemoCharges(settings=settings)
    async with loop.run(loop_n=1) as results:
        (result,) = [r async for r in results]
    assert isinstance(result, StepResult) and result.attempts == 2
    assert loop.calls == 1
    assert (result.cost, result.tokens) == (2.5, 100)
    assert results.summary is not None and results.summary.cost == 2.5


class KilledAfterMemo(LoopBase):
    async def think(self, prev_out: dict[str, Any]) -> Any:
        value = await self.memo("model", self._model)
        marker = Path(self.settings.trace_path) / "stop"
        if not marker.exists():
            marker.write_text("stop here")
            await anyio.sleep_forever()
        return value

    async def _model(self) -> str:
        self.charge(3.0, tokens=7)
        return "answer"


async def test_a_memo_replayed_after_a_stop_is_charged_once(settings: LoopSettings) -> None:
    """The stopped run's charge was never saved (its step did not complete): the run that
    replays the call counts it, once."""
    loop = KilledAfterMemo(settings=settings)
    async with loop.run(loop_n=1):
        with anyio.fail_after(30):
            while not (Path(settings.trace_path) / "stop").exists():
                await anyio.sleep(0.01)
    again = KilledAfterMemo(settings=settings)  # nothing was saved: started again
    summary = await again.run(loop_n=1)
    assert summary.replayed == 1
    assert (summary.cost, summary.tokens) == (3.0, 7)
    assert again.spending.cost == 3.0
    assert again.loop_trace[0][0].cost == 3.0


class BadCharge(LoopBase):
    amount: Any = -1.0
    tokens: Any = 0

    async def think(self, prev_out: dict[str, Any]) -> Any:
        self.charge(self.amount, tokens=self.tokens)


@pytest.mark.parametrize(
    ("amount", "tokens", "words"),
    [
        (-1.0, 0, "cost must be a finite number >= 0, got -1.0"),
        (math.nan, 0, "cost must be a finite number >= 0, got nan"),
        ("3", 0, "cost must be a number >= 0, got '3'"),
        (1.0, -5, "tokens must be a whole number >= 0, got -5"),
    ],
)
async def test_a_bad_charge_is_a_value_error_naming_it(
    settings: LoopSettings, amount: Any, tokens: Any, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(BadCharge, "amount", amount)
    monkeypatch.setattr(BadCharge, "tokens", tokens)
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        await BadCharge(settings=settings).run(loop_n=1)


@pytest.mark.parametrize("all_cost", [-1, math.nan, "10", -math.inf])
def test_a_bad_all_cost_is_refused_at_the_call(settings: LoopSettings, all_cost: Any) -> None:
    loop = Paying(settings=settings)
    with pytest.raises(ValueError, match=f"all_cost must be a .*got {all_cost!r}"):
        loop.run(all_cost=all_cost)
    assert not Path(settings.trace_path).exists()  # nothing ran, nothing written


class SiblingsCharge(LoopBase):
    """Loop 1's ``think`` charges 1.0 inside a memoized call, then waits (the run is
    stopped there); loop 0's ``record`` waits for that charge, so loop 0's last snapshot,
    written after it, holds it."""

    async def think(self, prev_out: dict[str, Any]) -> Any:
        li = prev_out[self.LOOP_IDX_KEY]
        value = await self.memo("model", self._model, li)
        trace = Path(self.settings.trace_path)
        if li == 1 and not (trace / "go").exists():
            (trace / "loop 1 charged").write_text("x")
            await anyio.sleep_forever()
        return value

    async def record(self, prev_out: dict[str, Any]) -> Any:
        trace = Path(self.settings.trace_path)
        while not (trace / "loop 1 charged").exists():
            await anyio.sleep(0.01)
        return prev_out["think"]

    async def _model(self, li: int) -> str:
        self.charge(1.0, tokens=1)
        return f"answer {li}"


async def test_a_memo_charge_saved_by_a_sibling_snapshot_is_not_counted_again(
    settings: LoopSettings,
) -> None:
    settings = settings.model_copy(update={"step_semaphore": 2})
    trace = Path(settings.trace_path)
    loop = SiblingsCharge(settings=settings)
    with anyio.fail_after(60):
        async with loop.run(loop_n=2) as results:
            async for item in results:
                if (item.loop_idx, item.step_name) == (0, "record"):
                    break  # loop 0 is saved finished, its snapshot holds loop 1's charge
    (trace / "go").write_text("go")
    resumed = SiblingsCharge.load(settings.trace_path)
    assert resumed.spending.cost == 2.0
    summary = await resumed.run(loop_n=1)  # loop 1, unfinished, is that one
    assert summary.replayed == 1 and summary.loops == 1
    assert resumed.spending.cost == 2.0  # spent twice in all, counted twice in all
    assert resumed.spending.counted == set()  # forgotten once the step completed


class WithdrawAfterCharge(LoopBase):
    withdraw_loop_error = (LookupError,)

    async def propose(self, prev_out: dict[str, Any]) -> Any:
        self.charge(1.0)
        return "idea"

    async def coding(self, prev_out: dict[str, Any]) -> Any:
        self.charge(2.0)
        withdrawn = Path(self.settings.trace_path) / "withdrawn"  # not in self: rolled back
        if not withdrawn.exists():
            withdrawn.write_text("once")
            raise LookupError("roll back")
        return "code"


async def test_a_withdraw_does_not_roll_back_what_was_spent(settings: LoopSettings) -> None:
    loop = WithdrawAfterCharge(settings=settings)
    summary = await loop.run(loop_n=1)
    # propose 1 + coding 2 (withdrawn), then propose 1 + coding 2 again: all spent
    assert summary.cost == 6.0
    assert loop.spending.cost == 6.0
