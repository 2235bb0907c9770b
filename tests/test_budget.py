"""Duration parsing, count checks and the timer."""

from __future__ import annotations

import pickle
from datetime import timedelta

import anyio
import pytest
from looplib import virtual_clock_params

from rdagent_loop import Timer, parse_duration
from rdagent_loop._budget import StepBudget, check_count


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("0.5h", 1800),
        ("1d", 86400),
        ("45", 45),
        ("1.5", 1.5),
        (".5m", 30),
        (12, 12),
        (2.5, 2.5),
        (timedelta(minutes=2), 120),
        ("99999999d", 99999999 * 86400),
        (10**9 * 86400 - 86400, 999999999 * 86400),
    ],
)
def test_durations_in_the_grammar_parse(text: object, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "bad",
    [
        *["1min", "2 hours", "PT1H", "-5s", "", "   ", "1h30m", "abc", "5x", "nan", -1, True, [1]],
        # no spaces, ASCII digits only (U+0663 is an Arabic-Indic three, U+FF13 a full-width one)
        *[" 2h", "2h ", " 10s ", "2h\n", "\t90s", "\u0663s", "\uff13", "1e3"],
        # more than a timedelta holds: a ValueError, not an OverflowError
        *[1e300, float("inf"), 10**9 * 86400, "99999999999d"],
        pytest.param(10**400, id="10**400"),
        pytest.param("1" * 400, id="'1'*400"),
        timedelta(seconds=-1),
        float("nan"),
    ],
)
def test_bad_durations_are_refused_naming_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match="all_duration") as info:
        parse_duration(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_counts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="step_n") as info:
        check_count(bad, "step_n")
    assert repr(bad) in str(info.value)


def test_the_longest_duration_a_timedelta_holds_is_a_budget_the_timer_keeps() -> None:
    timer = Timer()
    timer.reset(timedelta.max)
    assert timer.remain_time() == timedelta.max
    timer.arm()  # float arithmetic on ~8.6e13 seconds may round past timedelta.max
    assert timedelta.max - timer.remain_time() < timedelta(seconds=1)  # type: ignore[operator]


def test_a_pickled_timer_keeps_its_remaining_time() -> None:
    timer = Timer()
    assert timer.remain_time() is None
    timer.reset("2h")
    clone = pickle.loads(pickle.dumps(timer))
    assert clone.started
    assert clone.remain_time() == timedelta(hours=2)


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
@pytest.mark.anyio
async def test_the_timer_counts_down_on_the_event_loop_clock() -> None:
    timer = Timer()
    timer.reset("10s")
    timer.arm()
    await anyio.sleep(4)
    assert timer.remain_time() == timedelta(seconds=6)
    timer.add_duration(timedelta(seconds=5))
    assert timer.remain_time() == timedelta(seconds=11)
    await anyio.sleep(11)
    assert timer.is_timeout()
    timer.disarm()
    assert timer.remain_time() == timedelta(0)


@pytest.mark.anyio
async def test_the_step_budget_makes_waiters_wait_for_a_refund() -> None:
    budget = StepBudget(1)
    await budget.reserve()
    got_it = anyio.Event()

    async def second() -> None:
        await budget.reserve()
        got_it.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert not got_it.is_set()
        budget.release()  # the first step failed: its unit is free again
        await got_it.wait()
    budget.spend()
    assert budget.exhausted
