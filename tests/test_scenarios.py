"""The failure scenarios of ../shared/SCENARIOS.md that the engine itself must pass.

Numbers refer to that file. Scenarios about executors (10, 18-20, 24) live in
tests/executors/, the deeper snapshot ones in tests/session/.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
import trio
from looplib import (
    Chain,
    CoderError,
    PolicyError,
    RDLoop,
    SyncChain,
    run_cancelled_after,
    virtual_clock_params,
)

from rdagent_loop import LoopBase, LoopSettings, RunSummary

pytestmark = pytest.mark.anyio


def with_(settings: LoopSettings, **changes: Any) -> LoopSettings:
    return settings.model_copy(update=changes)


def snapshot_files(loop: LoopBase) -> list[Path]:
    return sorted(p for p in loop.session_folder.glob("*/*_*") if p.is_file())


def newest_file(loop: LoopBase) -> Path:
    from rdagent_loop import list_snapshots

    return list_snapshots(loop.session_folder)[-1].path


# -- loop classes (module level, so snapshots can pickle them) ----------------------------


class Slow(LoopBase):
    async def s0(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(5)

    def s1(self, prev_out: dict[str, Any]) -> None: ...


class Extends(Chain):
    async def s1(self, prev_out: dict[str, Any]) -> str:
        if prev_out[self.LOOP_IDX_KEY] == 0:
            self.timer.add_duration(timedelta(seconds=10))
        return await super().s1(prev_out)


class Fast(LoopBase):
    def __init__(self, settings: LoopSettings) -> None:
        super().__init__(settings)
        self.in_flight_at_kickoff: list[int] = []

    def propose(self, prev_out: dict[str, Any]) -> None:
        self.in_flight_at_kickoff.append(self.get_unfinished_loop_cnt(self.loop_idx))

    async def work(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(1)

    def record(self, prev_out: dict[str, Any]) -> None: ...


class WithHelpers(LoopBase):
    helper_cls = dict

    class Inner:
        pass

    @staticmethod
    def helper() -> None: ...

    def work(self, prev_out: dict[str, Any]) -> None: ...


class Skips(Chain):
    skip_loop_error = (CoderError,)
    skip_loop_error_stepname = "s3"

    async def s1(self, prev_out: dict[str, Any]) -> str:
        await anyio.sleep(0.01)
        raise CoderError("bad code")

    async def s3(self, prev_out: dict[str, Any]) -> str:
        assert isinstance(prev_out[self.EXCEPTION_KEY], CoderError)
        return "recorded"


class FailsBeforeDeadline(LoopBase):
    async def s0(self, prev_out: dict[str, Any]) -> None:
        if prev_out[self.LOOP_IDX_KEY] == 1:
            await anyio.sleep(0.999)
            raise ZeroDivisionError("just before the deadline")

    async def s1(self, prev_out: dict[str, Any]) -> None:
        await anyio.sleep(5)


class FailsWhileCancelled(LoopBase):
    async def s0(self, prev_out: dict[str, Any]) -> None:
        try:
            await anyio.sleep(5)
        except anyio.get_cancelled_exc_class():
            raise OSError("cleanup failed while the deadline stopped the run") from None


class LastFails(Chain):
    skip_loop_error = (CoderError,)
    skip_loop_error_stepname = "s2"

    async def s3(self, prev_out: dict[str, Any]) -> str:
        raise CoderError("record failed")


class WithdrawOnce(Chain):
    withdraw_loop_error = (PolicyError,)
    done = False

    async def s2(self, prev_out: dict[str, Any]) -> str:
        if prev_out[self.LOOP_IDX_KEY] == 1 and not WithdrawOnce.done:
            WithdrawOnce.done = True
            raise PolicyError("bad proposal")
        return await super().s2(prev_out)


class Withdraws(LoopBase):
    withdraw_loop_error = (PolicyError,)
    tries: dict[int, int] = {}
    cancelled: list[int] = []

    async def s0(self, prev_out: dict[str, Any]) -> str:
        return f"s0@{prev_out[self.LOOP_IDX_KEY]}"

    async def s1(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["s0"] == f"s0@{li}"
        Withdraws.tries[li] = Withdraws.tries.get(li, 0) + 1
        if li == 1 and Withdraws.tries[li] == 1:
            await anyio.sleep(0.05)
            raise PolicyError("withdraw loop 1")
        if li == 0 and Withdraws.tries[li] == 1:
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                Withdraws.cancelled.append(li)
                raise
        return f"s1@{li}"

    async def s2(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["s1"] == f"s1@{li}"
        return f"s2@{li}"


class CrashOnce(Chain):
    crashed = False

    async def s2(self, prev_out: dict[str, Any]) -> str:
        if not CrashOnce.crashed:
            CrashOnce.crashed = True
            raise OSError("disk full")
        return await super().s2(prev_out)


class StopsAtTwo(Chain):
    def _check_exit_conditions_on_step(
        self, loop_id: int | None = None, step_id: int | None = None
    ) -> None:
        if loop_id == 1 and step_id == 1:
            raise self.LoopTerminationError("good enough")


class Waits(RDLoop):
    async def direct_exp_gen(self, prev_out: dict[str, Any]) -> int:
        await self.wait_for_capacity()
        assert self.get_unfinished_loop_cnt(self.loop_idx) < self.settings.max_parallel
        return await super().direct_exp_gen(prev_out)

    async def coding(self, prev_out: dict[str, Any]) -> str:
        return "code"

    async def running(self, prev_out: dict[str, Any]) -> str:
        await anyio.sleep(0.01)
        return "ran"


# -- budgets and termination ---------------------------------------------------------------


async def test_1_loop_n_ends_the_run(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, step_semaphore=2))
    summary = await loop.run(loop_n=3)
    assert summary == RunSummary(12, 3, "loop_n")
    assert sorted(loop.loop_prev_out) == [0, 1, 2]
    assert all(loop.step_idx[li] == 4 for li in range(3))


async def test_2_a_resumed_run_keeps_its_budget(settings: LoopSettings) -> None:
    loop = Chain(settings)
    summary = await loop.run(loop_n=3, step_n=5)
    assert summary.reason == "step_n"
    resumed = Chain.load(newest_file(loop))
    await resumed.run()
    assert resumed.loop_idx == 3
    assert max(resumed.loop_prev_out) == 2
    assert all(resumed.step_idx[li] == 4 for li in range(3))
    assert 3 not in resumed.step_idx


async def test_3_started_loops_are_finished_on_resume(settings: LoopSettings) -> None:
    loop = Chain(settings)
    await loop.run(loop_n=1)
    middle = loop.session_folder / "0" / "1_s1"
    resumed = Chain.load(middle)
    assert resumed.loop_n == 0  # the saved loop budget is exhausted...
    summary = await resumed.run()
    assert resumed.step_idx[0] == 4  # ...and the started loop is finished anyway
    assert summary == RunSummary(2, 1, "loop_n")
    assert resumed.executed[-2:] == [(0, "s2"), (0, "s3")]


async def test_3b_resume_after_a_spent_step_budget_finishes_the_loop(
    settings: LoopSettings,
) -> None:
    loop = Chain(settings)
    await loop.run(loop_n=1, step_n=2)
    resumed = Chain.load(loop.session_folder)
    summary = await resumed.run()
    assert resumed.step_idx[0] == 4
    assert summary == RunSummary(2, 1, "loop_n")


async def test_4_loop_n_on_resume_counts_new_work(settings: LoopSettings) -> None:
    loop = Chain(settings)
    await loop.run(loop_n=2)
    resumed = Chain.load(loop.session_folder)
    summary = await resumed.run(loop_n=2)
    assert summary == RunSummary(8, 2, "loop_n")
    assert sorted(li for li in resumed.step_idx if resumed.step_idx[li] == 4) == [0, 1, 2, 3]


async def test_4b_an_unfinished_loop_counts_first_against_loop_n(settings: LoopSettings) -> None:
    loop = Chain(settings)
    await loop.run(loop_n=1)
    resumed = Chain.load(loop.session_folder / "0" / "1_s1")
    summary = await resumed.run(loop_n=2)
    assert summary.loops == 2
    assert resumed.loop_idx == 2


@pytest.mark.parametrize("step_n", [3, 5, 7])
@pytest.mark.parametrize("parallel", [1, 3])
async def test_5_step_n_is_exact(settings: LoopSettings, step_n: int, parallel: int) -> None:
    loop = Chain(with_(settings, step_semaphore=parallel), delay=0.01)
    summary = await loop.run(step_n=step_n)
    finished = sum(1 for v in loop.step_idx.values() if v == 4)
    assert summary == RunSummary(step_n, finished, "step_n")
    # no step was started only to be thrown away
    assert len(loop.executed) == step_n
    assert sum(loop.step_idx.values()) == step_n


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_6_the_deadline_interrupts_a_step(settings: LoopSettings) -> None:
    loop = Slow(settings)
    start = anyio.current_time()
    summary = await loop.run(all_duration="1s")
    assert anyio.current_time() - start == pytest.approx(1)
    assert summary == RunSummary(0, 0, "all_duration")
    assert loop.step_idx[0] == 0 and loop.loop_idx == 0
    assert snapshot_files(loop) == []


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_6b_a_grace_period_lets_the_step_in_flight_finish(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, grace_period=10), delay=3)
    start = anyio.current_time()
    summary = await loop.run(all_duration="4s")
    # s0 ends at 3 s, s1 starts and ends at 6 s (inside the grace), then nothing new starts
    assert anyio.current_time() - start == pytest.approx(6)
    assert summary == RunSummary(2, 0, "all_duration")


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_6c_the_remaining_time_survives_a_resume(settings: LoopSettings) -> None:
    loop = Chain(settings, delay=1)
    summary = await loop.run(all_duration="2.5s")
    assert summary == RunSummary(2, 0, "all_duration")
    resumed = Chain.load(loop.session_folder / "0" / "1_s1")
    remaining = resumed.timer.remain_time()
    assert remaining is not None and remaining.total_seconds() == pytest.approx(0.5)
    start = anyio.current_time()
    await resumed.run()
    assert anyio.current_time() - start == pytest.approx(0.5)


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_6d_add_duration_moves_the_running_deadline(settings: LoopSettings) -> None:
    loop = Extends(settings, delay=1)
    summary = await loop.run(all_duration="3.5s")
    assert summary.steps == 13  # 3.5 s + 10 s: thirteen one-second steps fit


@pytest.mark.parametrize("bad", ["1min", "2 hours", "PT1H", "-5s", "", "1h30m"])
def test_7_bad_durations_are_refused(settings: LoopSettings, bad: str) -> None:
    with pytest.raises(ValueError, match="all_duration") as info:
        Chain(settings).run(all_duration=bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_8_kickoff_admits_no_more_loops_than_the_free_capacity(
    settings: LoopSettings,
) -> None:
    loop = Fast(with_(settings, step_semaphore={"propose": 1, "work": 3}))
    summary = await loop.run(all_duration="10s")
    assert summary.reason == "all_duration"
    assert max(loop.in_flight_at_kickoff) < 3
    assert len(loop.in_flight_at_kickoff) <= 3 + 10 * 3  # not hundreds


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_9_termination_stops_siblings(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, step_semaphore=3), delay=0.02)
    await loop.run(step_n=7)
    before = snapshot_files(loop)
    assert len(before) == 7
    # on the virtual clock, a sibling left running would have finished fifteen steps by now
    await anyio.sleep(0.3)
    assert snapshot_files(loop) == before


# -- steps and errors ----------------------------------------------------------------------


def test_11_class_attributes_are_not_steps() -> None:
    assert WithHelpers.steps == ["work"]


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_12_record_and_feedback_never_overlap(settings: LoopSettings) -> None:
    loop = RDLoop(with_(settings, step_semaphore=4))
    summary = await loop.run(loop_n=8)
    assert summary.loops == 8
    assert loop.conc.peak["feedback"] == 1
    assert loop.conc.peak["record"] == 1
    assert loop.conc.peak["coding"] > 1
    assert loop.conc.peak["coding"] <= 4


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_per_step_limits_are_reached_and_never_exceeded(settings: LoopSettings) -> None:
    limits = {"direct_exp_gen": 1, "coding": 3, "running": 2, "feedback": 1, "record": 1}
    loop = RDLoop(with_(settings, step_semaphore=limits))
    stats_peak: dict[str, int] = {}
    async with loop.run(loop_n=9) as results:
        async for _ in results:
            pass
    stats_peak = {k: v for k, v in loop.conc.peak.items()}
    assert stats_peak == {
        "direct_exp_gen": 1,
        "coding": 3,
        "running": 2,
        "feedback": 1,
        "record": 1,
    }


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_admission_never_exceeds_max_parallel(settings: LoopSettings) -> None:
    loop = RDLoop(with_(settings, step_semaphore=3))
    peak = 0
    async with loop.run(loop_n=10) as results:
        async for _ in results:
            unfinished = loop.get_unfinished_loop_cnt(loop.loop_idx)
            peak = max(peak, unfinished)
            assert unfinished <= 3
    assert peak == 3


async def test_13_failed_steps_keep_their_timing(settings: LoopSettings) -> None:
    loop = Skips(settings)
    results = []
    async with loop.run(loop_n=1) as stream:
        async for result in stream:
            results.append(result)
    assert [r.step_name for r in results] == ["s0", "s1", "s3"]  # s2 was jumped over
    failed = results[1]
    assert isinstance(failed.exception, CoderError) and failed.output is None
    trace = loop.loop_trace[0]
    assert [t.step_idx for t in trace] == [0, 1, 3]
    assert trace[1].end > trace[1].start
    assert "CoderError" in (trace[1].exception or "")
    assert isinstance(loop.loop_prev_out[0][Skips.EXCEPTION_KEY], CoderError)
    assert loop.loop_prev_out[0]["s1"] is None


async def test_14_kickoff_never_starves_the_workers(settings: LoopSettings) -> None:
    loop = SyncChain(with_(settings, step_semaphore=2))
    finished_while_kicking: list[int] = []

    async with loop.run(step_n=40) as results:
        async for result in results:
            if result.step_idx == 0:
                finished_while_kicking.append(sum(1 for v in loop.step_idx.values() if v == 4))
    assert results.summary is not None
    assert (results.summary.steps, results.summary.reason) == (40, "step_n")
    assert finished_while_kicking[-1] > 0


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_15_a_step_error_is_never_swallowed_by_the_deadline(
    settings: LoopSettings,
) -> None:
    loop = FailsBeforeDeadline(with_(settings, step_semaphore={"s0": 2, "s1": 2}))
    with pytest.raises(ZeroDivisionError):
        await loop.run(all_duration="1s")


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_15b_an_error_raised_during_the_stop_reaches_the_caller(
    settings: LoopSettings,
) -> None:
    with pytest.raises(OSError, match="cleanup failed"):
        await FailsWhileCancelled(settings).run(all_duration="1s")


async def test_16_a_skip_in_the_last_step_does_not_jump_backwards(settings: LoopSettings) -> None:
    loop = LastFails(settings)
    summary = await loop.run(loop_n=2)
    assert summary == RunSummary(8, 2, "loop_n")
    assert [name for li, name in loop.executed if li == 0] == ["s0", "s1", "s2"]


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_17_async_steps_run_in_parallel(settings: LoopSettings) -> None:
    loop = RDLoop(with_(settings, step_semaphore=4))
    start = anyio.current_time()
    await loop.run(loop_n=4)
    elapsed = anyio.current_time() - start
    # one loop takes 3.01 s; four in sequence would take 12 s
    assert elapsed < 6
    assert loop.conc.peak["coding"] == 4


async def test_withdraw_rolls_back_and_the_run_goes_on(settings: LoopSettings) -> None:
    WithdrawOnce.done = False
    loop = WithdrawOnce(with_(settings, step_semaphore=2))
    summary = await loop.run(loop_n=3)
    assert WithdrawOnce.done
    assert summary.reason == "loop_n"
    assert summary.loops == 3  # a loop finished, rolled back and finished again counts once
    assert all(loop.step_idx[li] == 4 for li in range(3))
    # loop 1 was rolled back to before its first step and run again
    assert loop.executed.count((1, "s0")) == 1  # the restored state forgot the first try
    assert loop.loop_idx == 3


async def test_29_withdraw_cancels_the_sibling_in_flight(settings: LoopSettings) -> None:
    Withdraws.tries, Withdraws.cancelled = {}, []

    loop = Withdraws(with_(settings, step_semaphore=2))
    summary = await loop.run(loop_n=2)
    assert Withdraws.cancelled == [0]
    assert summary.reason == "loop_n"
    assert loop.loop_prev_out[0]["s2"] == "s2@0"
    assert loop.loop_prev_out[1]["s2"] == "s2@1"


# -- snapshots and resume (the engine's side) ---------------------------------------------


async def test_21_the_snapshot_points_at_the_next_step(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, step_semaphore=2))
    await loop.run(loop_n=3)
    files = snapshot_files(loop)
    assert len(files) == 12
    for file in files:
        li, si = int(file.parent.name), int(file.name.split("_")[0])
        assert Chain.load(file).step_idx[li] == si + 1


async def test_22_a_crashed_step_is_not_saved_as_done(settings: LoopSettings) -> None:
    CrashOnce.crashed = False
    loop = CrashOnce(settings)
    with pytest.raises(OSError, match="disk full"):
        await loop.run(loop_n=1)
    assert loop.step_idx[0] == 2
    assert CrashOnce.load(loop.session_folder).step_idx[0] == 2
    assert [p.name for p in snapshot_files(loop)] == ["0_s0", "1_s1"]
    summary = await loop.run()  # the same object, again: step 2 runs again
    assert summary == RunSummary(2, 1, "loop_n")
    assert loop.executed == [(0, "s0"), (0, "s1"), (0, "s2"), (0, "s3")]


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_23_a_cancelled_step_is_not_marked_done(settings: LoopSettings) -> None:
    # the thread writer: a run waits for a writer process to start, and a virtual clock
    # jumps while it waits on a real process (past this test's 2.5 s)
    loop = Chain(settings.model_copy(update={"snapshot_writer": "thread"}), delay=1)
    # s0 ends at 1 s, s1 at 2 s; s2 is cancelled half-way (the 2.5 s count from s0's start)
    await run_cancelled_after(loop, 2.5, loop_n=1)
    assert loop.step_idx[0] == 2
    assert [p.name for p in snapshot_files(loop)] == ["0_s0", "1_s1"]
    await loop.run()
    assert loop.step_idx[0] == 4


def test_28_running_twice_works_in_new_event_loops(settings: LoopSettings) -> None:
    loop = Chain(settings)
    assert asyncio.run(loop.run(loop_n=1)).loops == 1
    assert trio.run(lambda: loop.run(loop_n=1)).loops == 1
    assert asyncio.run(loop.run(loop_n=1)).loops == 1
    assert loop.loop_idx == 3


async def test_hook_termination_stops_the_run_cleanly(settings: LoopSettings) -> None:
    summary = await StopsAtTwo(settings).run(loop_n=5)
    assert summary == RunSummary(6, 1, "terminated")


async def test_wait_for_capacity_is_event_driven(settings: LoopSettings) -> None:
    summary = await Waits(with_(settings, step_semaphore=2)).run(loop_n=4)
    assert summary.loops == 4
