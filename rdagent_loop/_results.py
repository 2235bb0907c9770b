"""Immutable records of what a run did: StepResult, RunSummary, LoopTrace."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

StopReason = Literal["loop_n", "step_n", "all_duration", "all_cost", "terminated"]

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40


@dataclass(frozen=True, slots=True)
class StepResult:
    """One completed step, as streamed to the caller. Results of one loop arrive in step order."""

    loop_idx: int
    step_idx: int
    step_name: str
    output: Any
    exception: BaseException | None
    started_at: datetime
    ended_at: datetime
    attempts: int = 1
    retried: tuple[BaseException, ...] = ()
    """Errors of the attempts that failed before the one that counted (``retries`` policy)."""
    cost: float = 0.0
    """What the step reported spending (``loop.charge``), all its attempts included; a
    memoized call's charges count once, in the run that made the call or the first run
    that replays it after a crash."""
    tokens: int = 0

    @property
    def duration(self) -> timedelta:
        return self.ended_at - self.started_at

    @property
    def ok(self) -> bool:
        return self.exception is None

    def __str__(self) -> str:
        seconds = self.duration.total_seconds()
        head = f"loop {self.loop_idx} step {self.step_idx} {self.step_name}"
        if self.exception is not None:
            what = f"skipped after {type(self.exception).__name__}: {self.exception}"
        else:
            what = f"-> {_short.repr(self.output)}"
        tries = f" ({self.attempts} attempts)" if self.attempts > 1 else ""
        spent = f" (cost {self.cost:g})" if self.cost else ""
        return f"{head} in {seconds:.3f}s{tries}{spent} {what}"


@dataclass(frozen=True, slots=True)
class Question:
    """A step asks a person (``loop.ask``): an item of the result stream, between the
    ``StepResult``s. Answer it with ``results.answer(id, value)``, or from any process with
    ``rdagent_loop.answer(session, id, value)``; ``id`` stays the same after a resume."""

    id: str
    loop_idx: int
    step_idx: int
    step_name: str
    question: str
    payload: Any
    asked_at: datetime

    def __str__(self) -> str:
        payload = "" if self.payload is None else f" about {_short.repr(self.payload)}"
        return (
            f"loop {self.loop_idx} step {self.step_idx} {self.step_name} asks "
            f"{self.question!r}{payload} (question {self.id})"
        )


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What one ``run()`` did: steps and loops completed in this run, and why it stopped."""

    steps: int
    loops: int
    reason: StopReason
    replayed: int = 0
    """Memoized calls (``loop.memo``) answered from the step journal instead of made again."""
    cost: float = 0.0
    """What the steps of this run reported spending (``loop.charge``), failed and cancelled
    attempts included; ``loop.spending`` holds the total of every run of the session."""
    tokens: int = 0

    def __str__(self) -> str:
        steps = f"{self.steps} step{'' if self.steps == 1 else 's'}"
        loops = f"{self.loops} loop{'' if self.loops == 1 else 's'}"
        calls = "call" if self.replayed == 1 else "calls"
        replayed = f", {self.replayed} memoized {calls} replayed" if self.replayed else ""
        spent = f", cost {self.cost:g} ({self.tokens} tokens)" if self.cost or self.tokens else ""
        return f"{steps}, {loops} completed; stopped by {self.reason}{replayed}{spent}"


@dataclass(frozen=True, slots=True)
class LoopTrace:
    """Timing of one finished step of a loop (kept in ``loop.loop_trace[loop_idx]``)."""

    start: datetime
    end: datetime
    step_idx: int
    step_name: str = ""
    exception: str | None = None
    waits: tuple[tuple[datetime, datetime], ...] = ()
    """When the step waited for answers to its questions (``loop.ask``), start and end."""
    cost: float = 0.0
    """What the step reported spending (``loop.charge``)."""
    tokens: int = 0

    def __reduce__(self) -> tuple[Any, ...]:
        # a frozen slots dataclass otherwise pickles through a Python-level __getstate__;
        # the fields after ``exception`` only when set, so a plain trace stays small
        fields: tuple[Any, ...] = (self.start, self.end, self.step_idx, self.step_name)
        fields += (self.exception,)
        if self.tokens:
            fields += (self.waits, self.cost, self.tokens)
        elif self.cost:
            fields += (self.waits, self.cost)
        elif self.waits:
            fields += (self.waits,)
        return (LoopTrace, fields)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


def _utc_trace(start: int, end: int, *rest: Any) -> LoopTrace:
    """How rdagent_loop 0.1 pickled a ``LoopTrace`` (its sessions still refer to it)."""
    return LoopTrace(
        _EPOCH + timedelta(microseconds=start), _EPOCH + timedelta(microseconds=end), *rest
    )
