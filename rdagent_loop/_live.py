"""The live view of ``rdagent-loop run``: one line per loop in flight, overall steps, time left.

On a terminal it redraws a small block at the bottom of the screen a few times a second and
prints finished loops and warnings above it. Elsewhere (a pipe, a log file, CI) it prints
one plain line per finished step instead, so the output stays readable as a log.
It reads the run from the outside only: ``StepResult``s from the stream, and the public
state of the loop (``step_idx``, ``loop_trace``, ``timer``) and of the run (``statistics()``).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO

import anyio

from ._inspect import summarize
from ._timeline import format_seconds

if TYPE_CHECKING:
    from . import LoopBase, LoopRun, StepResult


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LiveDisplay:
    """Feed it results with :meth:`result`; run :meth:`refresh_forever` beside the run."""

    def __init__(
        self,
        loop: LoopBase,
        stream: TextIO,
        *,
        interactive: bool,
        total_steps: int | None,
        verbose: bool = False,
    ) -> None:
        self.loop = loop
        self.stream = stream
        self.interactive = interactive
        self.total_steps = total_steps
        self.verbose = verbose
        self.started = time.monotonic()
        self.steps_done = 0
        self.loops_done = 0
        self.failures = 0
        self._run: LoopRun | None = None
        self._drawn = 0  # lines of the live block on screen
        self._low = 0  # every loop below this one is finished
        self._closed = False

    def attach(self, run: LoopRun) -> None:
        self._run = run

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
        self.steps_done += 1
        n = len(self.loop.steps)
        if result.exception is not None:
            self.failures += 1
            self.message(
                f"  loop {result.loop_idx}: {result.step_name} failed "
                f"({type(result.exception).__name__}: {summarize(str(result.exception), 100)})"
            )
        finished = self.loop.step_idx.get(result.loop_idx, 0) >= n
        if finished:
            self.loops_done += 1
        if not self.interactive or self.verbose:
            if result.exception is None:
                seconds = format_seconds(result.duration.total_seconds())
                self.message(
                    f"  loop {result.loop_idx} {result.step_name} ({seconds}): "
                    f"{summarize(result.output, 110)}"
                )
        elif finished and result.step_idx == n - 1:
            text = summarize(result.output, 110)
            text = text.removeprefix(f"loop {result.loop_idx}: ")  # it says so already
            self.message(f"  loop {result.loop_idx} done: {text}")
        elif self.interactive:
            self.draw()

    def close(self) -> None:
        if self.interactive:
            self._clear()
        self._closed = True

    # -- the live block -------------------------------------------------------------------

    def header(self) -> str:
        loop = self.loop
        total = f"/{self.total_steps}" if self.total_steps else ""
        elapsed = time.monotonic() - self.started
        parts = [
            f"{type(loop).__name__}",
            f"steps {self.steps_done}{total}",
            f"loops {self.loops_done} done, {len(self.in_flight())} in flight",
            f"elapsed {_clock(elapsed)}",
        ]
        remaining = loop.timer.remain_time() if loop.timer.started else None
        if remaining is not None:
            parts.append(f"time left {_clock(remaining.total_seconds())}")
        elif self.total_steps and self.steps_done:
            left = elapsed / self.steps_done * max(0, self.total_steps - self.steps_done)
            parts.append(f"time left ~{_clock(left)}")
        if self.failures:
            parts.append(f"{self.failures} failed")
        return " · ".join(parts)

    def in_flight(self) -> list[int]:
        """Loops started and not finished (the one being kicked off included)."""
        loop = self.loop
        n = len(loop.steps)
        while self._low < loop.loop_idx and loop.step_idx.get(self._low, 0) >= n:
            self._low += 1
        loops = [li for li in range(self._low, loop.loop_idx) if loop.step_idx.get(li, 0) < n]
        if self._run is not None:
            try:
                running = self._run.statistics().steps_running
            except RuntimeError:
                running = {}
            if running.get(loop.steps[0], 0) > 0:
                loops.append(loop.loop_idx)
        return loops

    def lines(self) -> list[str]:
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
            traces = loop.loop_trace.get(li) or []
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
