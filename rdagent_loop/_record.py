"""Recording a completed step in the loop's state, all at once.

The contract: a step's result is recorded and its ``step_idx`` advanced in the same instant the
step returns (no await in between), so no snapshot shows a step as half done.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._results import LoopTrace

if TYPE_CHECKING:
    from ._loop import LoopBase


def record_step(
    loop: LoopBase,
    loop_idx: int,
    step_idx: int,
    output: Any,
    error: BaseException | None,
    started: datetime,
    ended: datetime,
    waits: tuple[tuple[datetime, datetime], ...] = (),
    cost: float = 0.0,
    tokens: int = 0,
) -> int:
    """Record step ``step_idx`` of loop ``loop_idx`` as completed; return the loop's next step.

    ``error`` is a skip error: the output is ``None``, the error is kept in ``prev_out``, and
    the loop jumps to the skip target, or ends when it already is at or past it.
    """
    n = len(loop.steps)
    name = loop.steps[step_idx]
    prev_out = loop.loop_prev_out[loop_idx]
    prev_out[name] = output
    if error is not None:
        prev_out[loop.EXCEPTION_KEY] = error
        target = loop.skip_target
        next_step = target if step_idx < target else n
    else:
        next_step = step_idx + 1
    loop.step_idx[loop_idx] = next_step
    loop.loop_trace[loop_idx].append(
        LoopTrace(
            started,
            ended,
            step_idx,
            name,
            None if error is None else repr(error),
            waits,
            cost,
            tokens,
        )
    )
    if step_idx == 0 and loop_idx == loop.loop_idx:
        loop.loop_idx += 1  # the kickoff's loop: the next one may be proposed
        if loop.loop_n is not None:
            loop.loop_n = max(0, loop.loop_n - 1)
    return next_step
