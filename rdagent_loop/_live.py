"""The live view of ``rdagent-loop run``: one line per loop in flight, overall steps, time left.

On a terminal it redraws a small block at the bottom of the screen a few times a second and
prints finished loops and warnings above it. Elsewhere (a pipe, a log file, CI) it prints
one plain line per finished step instead, so the output stays readable as a log.
It reads the run from the outside only: ``StepResult``s and ``Question``s from the stream,
and the public state of the loop (``step_idx``, ``loop_trace``, ``timer``, ``spending``: the
money spent, and left of the cost budget) and of the run (``statistics()``: how many steps
wait for an answer, too).
"""

from __future__ import annotations

import math
import shutil
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

import anyio

from ._budget import Spending
from ._inspect import summarize
from ._loops import peek
from ._timeline import format_cost, format_seconds

if TYPE_CHECKING:
    from . import LoopBase, LoopRun, Question, StepResult
    from ._run import RunStatistics


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LiveDisplay:
    """Feed it results with :meth:`result`; run :meth:`refresh_forever` beside the run.

    Its numbers hold across a withdraw, which restores an older state and runs steps again:
    a loop counts as done once (a set of loop indices, not a count of results), only while
    the loop's state says it is finished, and its "done" line is printed once. ``steps X/Y``
    counts the steps completed in this run (steps run again included, as the run's summary
    does) against that count plus the steps still to go, so X never passes Y.
    """

    def __init__(
        self,
        loop: LoopBase,
        stream: TextIO,
        *,
        interactive: bool,
        step_n: int | None = None,
        loop_n: int | None = None,
        cost_limit: float | None = None,
        verbose: bool = False,
        answer_with: str | None = None,
    ) -> None:
        """``step_n`` and ``loop_n``: the budgets the run starts with (a resumed session's
        saved ones, or the command line's), until the run has set them on the loop.
        ``cost_limit``: the run's ``all_cost`` (the session's total that stops it).
        ``answer_with``: the command that answers a question, but for its id and value
        (``rdagent-loop answer <session>``)."""
        self.loop = loop
        self.answer_with = answer_with
        self.stream = stream
        self.interactive = interactive
        self.verbose = verbose
        self.started = time.monotonic()
        self._budgets = (step_n, loop_n)
        self.cost_limit = None if cost_limit is None or math.isinf(cost_limit) else cost_limit
        self.steps_done = 0  # results received: steps completed in this run
        self.finished: set[int] = set()  # loops finished in this run (and not rolled back)
        self.failed: dict[int, int] = {}  # loop -> the step that raised its skip error
        self.withdrawals = 0
        self._announced: set[int] = set()  # loops whose "done" line is printed
        self._errors: dict[int, tuple[str, str]] = {}  # loop -> its skip error: type, line
        self._state = loop.step_idx  # a withdraw replaces it (the state is restored)
        self._run: LoopRun | None = None
        self._drawn = 0  # lines of the live block on screen
        self._low = 0  # every loop below this one is finished
        self._closed = False

    @property
    def loops_done(self) -> int:
        return len(self.finished)

    def attach(self, run: LoopRun) -> None:
        self._run = run

    def _sync(self) -> None:
        """Notice a withdraw: the loop's state was restored from an older snapshot."""
        loop = self.loop
        if loop.step_idx is self._state:
            return
        self._state = loop.step_idx
        self.withdrawals += 1
        self._low = 0  # loops finished before may be unfinished again
        n = len(loop.steps)
        self.finished = {li for li in self.finished if loop.step_idx.get(li, 0) >= n}
        self.failed = {li: si for li, si in self.failed.items() if loop.step_idx.get(li, 0) > si}

    def _ends_loop(self, result: StepResult) -> bool:
        """Whether ``result`` is the last step its loop runs (a skip may end it early)."""
        if result.exception is None:
            return result.step_idx == len(self.loop.steps) - 1
        return result.step_idx >= self.loop.skip_target

    # -- output ---------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # the reader went away, or the stream closed
            pass

    def _clear(self) -> None:
        if self._drawn:
            self._write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def message(self, text: str) -> None:
        """Print a permanent line (above the live block)."""
        if self.interactive:
            self._clear()
            self._write(text + "\n")
            self.draw()
        else:
            self._write(text + "\n")

    def result(self, result: StepResult) -> None:
        self._sync()
        self.steps_done += 1
        loop, li = self.loop, result.loop_idx
        n = len(loop.steps)
        at = loop.step_idx.get(li, 0)  # where the loop's state is now
        error = result.exception
        if error is not None:
            self._errors[li] = (
                type(error).__name__,
                f"{result.step_name} failed: {type(error).__name__}: {summarize(str(error), 100)}",
            )
            if at > result.step_idx:  # not rolled back by a withdraw since
                self.failed[li] = result.step_idx
        # a result that ended its loop counts while the state agrees: one delivered before
        # a withdraw rolled its loop back does not
        finished = self._ends_loop(result) and at >= n
        if finished:
            self.finished.add(li)
        if not self.interactive or self.verbose:
            if error is not None:
                self.message(f"  loop {li}: {self._errors[li][1]}")
            else:
                seconds = format_seconds(result.duration.total_seconds())
                if result.cost:
                    seconds += f", cost {format_cost(result.cost)}"
                    if self.cost_limit is not None:
                        seconds += f", {format_cost(self._cost())} of "
                        seconds += f"{format_cost(self.cost_limit)} spent"
                self.message(
                    f"  loop {li} {result.step_name} ({seconds}): {summarize(result.output, 110)}"
                )
        elif finished and li not in self._announced:
            self._announced.add(li)
            text = summarize(result.output, 110).removeprefix(f"loop {li}: ")  # said already
            if li in self.failed:  # one line for the loop, its error in it
                type_name, failure = self._errors[li]
                if type_name not in text:
                    text = f"{text} ({failure})" if text else failure
            self.message(f"  loop {li} done: {text}")
        else:
            self.draw()

    def question(self, question: Question) -> None:
        """A step asks (``loop.ask``): say what, and how to answer it."""
        payload = "" if question.payload is None else f" about {summarize(question.payload, 80)}"
        how = (
            f" — answer with: {self.answer_with} {question.id} '<json>'"
            if self.answer_with
            else f" (question {question.id})"
        )
        self.message(
            f"  loop {question.loop_idx} step {question.step_name} asks: "
            f"{summarize(question.question, 200)}{payload}{how}"
        )

    def _cost(self) -> float:
        """The session's total spent so far (``loop.spending``, which a withdraw replaces)."""
        spending = self.loop.__dict__.get("spending")
        return spending.cost if isinstance(spending, Spending) else 0.0

    def spent(self) -> str:
        """``spent 1.23 of 5 (3.77 left)``; ``spent 1.23`` without a budget; "" when nothing
        was spent and there is no budget. The session's total (``loop.spending``)."""
        cost = self._cost()
        limit = self.cost_limit
        if limit is not None:
            left = format_cost(max(0.0, limit - cost))
            return f"spent {format_cost(cost)} of {format_cost(limit)} ({left} left)"
        return f"spent {format_cost(cost)}" if cost else ""

    def waiting(self) -> int:
        """Steps (so loops) waiting for an answer now, by the run's statistics."""
        stats = self._statistics()
        return sum(stats.steps_waiting.values()) if stats is not None else 0

    def close(self) -> None:
        if self.interactive:
            self._clear()
        self._closed = True

    # -- the live block -------------------------------------------------------------------

    def total_steps(self) -> int | None:
        """Steps completed in this run plus the steps the budgets still allow (None: no
        budget in steps or loops). Skips make the estimate shrink; a withdraw makes it grow."""
        loop = self.loop
        n = len(loop.steps)
        done = 0
        step_n, loop_n = self._budgets
        stats = self._statistics()
        if stats is not None and stats.steps_completed:
            # the run has set its budgets on the loop; both numbers are the engine's, so
            # they agree with each other even while results wait in the stream
            done, step_n, loop_n = stats.steps_completed, loop.step_n, loop.loop_n
        left: int | None = None
        if loop_n is not None:
            left = sum(n - loop.step_idx.get(li, 0) for li in self._unfinished()) + loop_n * n
        if step_n is not None:
            left = step_n if left is None else min(left, step_n)
        return None if left is None else done + left

    def _statistics(self) -> RunStatistics | None:
        if self._run is None:
            return None
        try:
            return self._run.statistics()
        except RuntimeError:  # not started yet
            return None

    def header(self) -> str:
        self._sync()
        loop = self.loop
        total = self.total_steps()
        elapsed = time.monotonic() - self.started
        parts = [
            f"{type(loop).__name__}",
            f"steps {self.steps_done}" + (f"/{total}" if total is not None else ""),
            f"loops {len(self.finished)} done, {len(self.in_flight())} in flight"
            + (f", {waiting} waiting for an answer" if (waiting := self.waiting()) else ""),
            f"elapsed {_clock(elapsed)}",
        ]
        remaining = loop.timer.remain_time() if loop.timer.started else None
        if remaining is not None:
            parts.append(f"time left {_clock(remaining.total_seconds())}")
        elif total is not None and self.steps_done:
            left = elapsed / self.steps_done * max(0, total - self.steps_done)
            parts.append(f"time left ~{_clock(left)}")
        if spent := self.spent():
            parts.append(spent)
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.withdrawals:
            parts.append(f"{self.withdrawals} withdrawn")
        return " · ".join(parts)

    def _unfinished(self) -> list[int]:
        """Loops past their first step and not finished, in the loop's state."""
        loop = self.loop
        n = len(loop.steps)
        while self._low < loop.loop_idx and loop.step_idx.get(self._low, 0) >= n:
            self._low += 1
        return [li for li in range(self._low, loop.loop_idx) if loop.step_idx.get(li, 0) < n]

    def in_flight(self) -> list[int]:
        """Loops started and not finished (the one being kicked off included)."""
        loop = self.loop
        loops = self._unfinished()
        stats = self._statistics()
        if stats is not None and stats.steps_running.get(loop.steps[0], 0) > 0:
            loops.append(loop.loop_idx)
        return loops

    def lines(self) -> list[str]:
        self._sync()
        loop = self.loop
        n = len(loop.steps)
        width = shutil.get_terminal_size((100, 24)).columns
        height = shutil.get_terminal_size((100, 24)).lines
        now = datetime.now(timezone.utc)
        out = [self.header()]
        flying = self.in_flight()
        room = max(1, height - 4)
        for li in flying[:room]:
            at = loop.step_idx.get(li, 0)
            name = loop.steps[at] if at < n else "done"
            traces = peek(loop.loop_trace, li) or []  # not "touched": nothing changed
            since = f"{format_seconds((now - traces[-1].end).total_seconds())}" if traces else ""
            bar = "█" * at + "░" * (n - at)
            out.append(f"  loop {li:>4} {bar} {name:<16} {since}")
        if len(flying) > room:
            out.append(f"  … and {len(flying) - room} more loops in flight")
        return [line[: width - 1] for line in out]

    def draw(self) -> None:
        if not self.interactive or self._closed:
            return
        lines = self.lines()
        self._clear()
        self._write("\n".join(lines) + "\n")
        self._drawn = len(lines)

    async def refresh_forever(self, interval: float = 0.25) -> None:
        if not self.interactive:
            await anyio.sleep_forever()
        while True:
            self.draw()
            await anyio.sleep(interval)
