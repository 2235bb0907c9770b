"""The progress display of library use: one bar of completed steps, as RD-Agent shows.

It is off when standard error is not a terminal or ``LoopSettings.progress`` is False.

The bar shares the terminal with the application's own output, so it never draws while the
application holds a result: the result stream clears it before handing a result over and
draws it again when the consumer asks for the next one (``pause``/``resume``), so a line the
consumer prints in between starts on a clean line and stays whole. It counts a result when
the consumer receives it (when nobody reads them, as the engine records it), so it never
runs ahead of what the consumer has seen.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._results import StepResult


class Progress(Protocol):
    def step_completed(self, result: StepResult) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    """Shows nothing."""

    def step_completed(self, result: StepResult) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """One tqdm bar of completed steps, with the newest result as its postfix."""

    def __init__(self, total: int | None, file: Any = None) -> None:
        from tqdm import tqdm

        # leave=False: the bar is gone once the run ends, and the terminal is the user's
        self._bar = tqdm(total=total, desc="run", unit="step", file=file, leave=False)
        self._paused = False
        self._closed = False

    def step_completed(self, result: StepResult) -> None:
        if self._closed:
            return
        bar = self._bar
        bar.set_postfix_str(f"loop {result.loop_idx} {result.step_name}", refresh=False)
        if self._paused:
            bar.n += 1  # drawn at resume
        else:
            bar.update(1)

    def pause(self) -> None:
        """Clear the bar: the application is about to write."""
        if not self._paused and not self._closed:
            self._paused = True
            self._bar.clear()

    def resume(self) -> None:
        """Draw the bar again: the application waits for the next result."""
        if self._paused and not self._closed:
            self._paused = False
            self._bar.refresh()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bar.close()


def make_progress(total: int | None, *, enabled: bool) -> Progress:
    """The display for a run of ``total`` steps (None: unknown), if enabled and on a terminal."""
    if not enabled or not sys.stderr.isatty():
        return NoProgress()
    return TqdmProgress(total)
