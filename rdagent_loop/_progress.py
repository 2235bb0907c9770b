"""The progress display: one line per loop in flight and one for the whole run (tqdm).

It is off when standard error is not a terminal or ``LoopSettings.progress`` is False.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._results import StepResult


class Progress(Protocol):
    def loop_admitted(self, loop_idx: int) -> None: ...
    def step_started(self, loop_idx: int, step_idx: int, name: str) -> None: ...
    def step_completed(self, result: StepResult) -> None: ...
    def loop_finished(self, loop_idx: int) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    """Shows nothing."""

    def loop_admitted(self, loop_idx: int) -> None:
        pass

    def step_started(self, loop_idx: int, step_idx: int, name: str) -> None:
        pass

    def step_completed(self, result: StepResult) -> None:
        pass

    def loop_finished(self, loop_idx: int) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """An overall bar of completed steps, and a bar per loop in flight below it."""

    def __init__(self, steps: list[str], total: int | None, file: Any = None) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._file = file
        self._steps = steps
        self._overall = tqdm(total=total, desc="run", unit="step", position=0, file=file)
        self._loops: dict[int, Any] = {}
        self._positions: dict[int, int] = {}
        self._free_positions: list[int] = []

    def _bar(self, loop_idx: int) -> Any:
        bar = self._loops.get(loop_idx)
        if bar is None:
            position = self._free_positions.pop(0) if self._free_positions else len(self._loops) + 1
            bar = self._tqdm(
                total=len(self._steps),
                desc=f"loop {loop_idx}",
                unit="step",
                position=position,
                leave=False,
                file=self._file,
            )
            self._positions[loop_idx] = position
            self._loops[loop_idx] = bar
        return bar

    def loop_admitted(self, loop_idx: int) -> None:
        self._bar(loop_idx)

    def step_started(self, loop_idx: int, step_idx: int, name: str) -> None:
        bar = self._bar(loop_idx)
        bar.n = step_idx
        bar.set_postfix_str(name)

    def step_completed(self, result: StepResult) -> None:
        self._overall.update(1)
        self._overall.set_postfix(loops=len(self._loops))
        bar = self._loops.get(result.loop_idx)
        if bar is not None:
            bar.n = result.step_idx + 1
            bar.refresh()

    def loop_finished(self, loop_idx: int) -> None:
        bar = self._loops.pop(loop_idx, None)
        if bar is not None:
            self._free_positions.append(self._positions.pop(loop_idx))
            self._free_positions.sort()
            bar.close()

    def close(self) -> None:
        for bar in self._loops.values():
            bar.close()
        self._loops.clear()
        self._overall.close()


def make_progress(steps: list[str], total: int | None, *, enabled: bool) -> Progress:
    """The display for a run of ``total`` steps (None: unknown), if enabled and on a terminal."""
    if not enabled or not sys.stderr.isatty():
        return NoProgress()
    return TqdmProgress(list(steps), total)
