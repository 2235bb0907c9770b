"""Budgets of a run: strict duration parsing, the timer, and step_n accounting."""

from __future__ import annotations

import math
import re
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from ._loop import LoopBase

# ASCII only: \d would also take "٣" (Arabic-Indic three), which float() reads as 3
_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?P<unit>[smhd]?)", re.ASCII)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object, *, name: str = "all_duration") -> timedelta:
    """Parse ``"90s"``, ``"0.5h"``, ``"2h"``, ``"1d"``, ``"30"``, a number or a timedelta.

    Anything else (``"1min"``, ``"2 hours"``, ``" 2h"``, ``"-5s"``, ``""``, a duration longer
    than a timedelta holds) is a ValueError naming the value: a budget that is silently
    ignored is worse than no budget.
    """
    if isinstance(value, timedelta):
        if value < timedelta(0):
            raise ValueError(f"{name} must not be negative, got {value!r}")
        return value
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if (isinstance(value, float) and math.isnan(value)) or value < 0:
            raise ValueError(f"{name} must be a non-negative duration, got {value!r}")
        seconds = value
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not match:
            raise ValueError(
                f"{name} must look like '90s', '30m', '2h', '1d' or a number of seconds, "
                f"got {value!r}"
            )
        seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    else:
        raise ValueError(f"{name} must be a str, a number or a timedelta, got {value!r}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:  # 10**400, 1e300, inf, "99999999999d": more than a timedelta holds
        raise ValueError(
            f"{name} must be at most {timedelta.max} (timedelta.max), got {value!r}"
        ) from None


def check_count(value: object, name: str) -> int | None:
    """Validate ``step_n``/``loop_n``: None or a non-negative int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return value


def _loop_time() -> float | None:
    """The event loop's clock (virtual clocks included), or None outside the event loop thread."""
    try:
        return anyio.current_time()
    except Exception:
        return None


class Timer:
    """The ``all_duration`` countdown, compatible with RD-Agent's ``RDAgentTimer``.

    It keeps the remaining time, not a wall-clock target, so a pickled timer resumes with the
    time that was left. While a run is active the deadline lives on the event loop's clock and
    :meth:`add_duration` moves the run's cancel scope with it.
    """

    def __init__(self) -> None:
        self.started = False
        self.all_duration: timedelta | None = None
        self.remain_time_duration: timedelta | None = None
        self._deadline: float | None = None  # on the event loop's clock
        self._deadline_mono = 0.0  # the same instant on time.monotonic(), for threads
        self._on_change: list[Any] = []

    def reset(self, all_duration: object) -> None:
        self.all_duration = parse_duration(all_duration)
        self.remain_time_duration = self.all_duration
        self.started = True
        self._deadline = None

    def arm(self) -> float:
        """Start counting down on the running event loop's clock; return the deadline."""
        if not self.started:
            return math.inf
        seconds = (self.remain_time_duration or timedelta(0)).total_seconds()
        now = _loop_time()
        self._deadline = (time.monotonic() if now is None else now) + seconds
        self._deadline_mono = time.monotonic() + seconds
        return self._deadline

    def disarm(self) -> None:
        """Stop counting (the run ended); what is left is kept for the next run."""
        if self._deadline is not None:
            self.remain_time_duration = self._remaining()
        self._deadline = None
        self._on_change.clear()

    def _remaining(self) -> timedelta:
        if self._deadline is None:
            return self.remain_time_duration or timedelta(0)
        now = _loop_time()
        left = self._deadline_mono - time.monotonic() if now is None else self._deadline - now
        try:
            return timedelta(seconds=max(0.0, left))
        except OverflowError:  # a budget of ~timedelta.max, rounded up by float arithmetic
            return timedelta.max

    def remain_time(self) -> timedelta | None:
        if not self.started:
            return None
        self.remain_time_duration = self._remaining()
        return self.remain_time_duration

    def update_remain_time(self) -> None:
        self.remain_time()

    def is_timeout(self) -> bool:
        remaining = self.remain_time()
        return remaining is not None and remaining <= timedelta(0)

    def restart_by_remain_time(self) -> None:
        """RD-Agent compatibility: the countdown restarts from what is left at the next run."""
        self._deadline = None

    def add_duration(self, duration: timedelta) -> None:
        """Give the run more (or, with a negative duration, less) time."""
        if not self.started:
            return
        if self._deadline is not None:
            self._deadline += duration.total_seconds()
            self._deadline_mono += duration.total_seconds()
            for callback in self._on_change:
                callback(self._deadline)
        else:
            self.remain_time_duration = (self.remain_time_duration or timedelta(0)) + duration

    def on_change(self, callback: Any) -> None:
        self._on_change.append(callback)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.started:
            state["remain_time_duration"] = self._remaining()
        state["_deadline"] = None
        state["_on_change"] = []
        return state


def check_amount(value: object, name: str, *, infinite: bool = False) -> float:
    """A cost: a finite number >= 0, or infinity when ``infinite`` (a budget with no limit);
    else ``ValueError`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if math.isnan(value) or value < 0 or (math.isinf(value) and not infinite):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_tokens(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"tokens must be a whole number >= 0, got {value!r}")
    return value


class Spending:
    """What a loop object's runs have spent (``loop.charge``) and the ``all_cost`` budget;
    saved with every snapshot, like the timer, so a resume does not get a fresh allowance."""

    def __init__(self) -> None:
        self.limit: float | None = None
        self.cost = 0.0
        self.tokens = 0
        # memoized calls whose charges ``cost`` holds (their journal entries' uids): a
        # resume replaying one of them counts its charges only if this snapshot did not
        self.counted: set[str] = set()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.counted = set()
        self.__dict__.update(state)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.cost >= self.limit

    def __repr__(self) -> str:
        limit = "" if self.limit is None else f" of {self.limit:g}"
        return f"<Spending {self.cost:g}{limit}, {self.tokens} tokens>"


class StepBudget:
    """``step_n`` accounting: a step reserves its unit before it starts.

    So in parallel mode no step starts that the budget cannot pay for; a step that is
    cancelled or fails gives its unit back.
    """

    def __init__(self, remaining: int | None) -> None:
        self.remaining = remaining
        self.reserved = 0
        self._changed = anyio.Event()
        self._waiting = 0

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def _notify(self) -> None:
        if self._waiting:  # a new Event at every step would cost more than the step
            self._changed.set()
            self._changed = anyio.Event()

    async def reserve(self) -> None:
        """Wait until one more step can be paid for, and reserve it."""
        while self.remaining is not None and self.reserved >= self.remaining:
            self._waiting += 1
            try:
                await self._changed.wait()
            finally:
                self._waiting -= 1
        self.reserved += 1

    def release(self) -> None:
        """The reserved step did not complete."""
        self.reserved -= 1
        self._notify()

    def spend(self) -> None:
        """The reserved step completed."""
        self.reserved -= 1
        if self.remaining is not None:
            self.remaining -= 1
        self._notify()


def carry_budgets(
    loop: LoopBase, *, step_n: int | None, loop_n: int | None
) -> tuple[int | None, int | None]:
    """The ``(step_n, loop_n)`` a run of ``loop`` starts with, from what the loop saved and
    ``run()``'s arguments.

    One rule, asked by the engine and by the CLI's resume: an argument wins; a step budget
    that was spent ended its run, so the next run has none (an unspent one, left by a crash,
    carries on); a ``loop_n`` argument counts the loops a resumed session had started first.
    """
    if step_n is None:
        step_n = None if loop.step_n == 0 else loop.step_n
    if loop_n is None:
        return step_n, loop.loop_n
    return step_n, max(0, loop_n - loop.get_unfinished_loop_cnt(loop.loop_idx))
