"""Calling a step function with its policies: a timeout per attempt and retries with backoff."""

from __future__ import annotations

from typing import Any

import anyio

from ._errors import StepTimeoutError
from ._executors import StepRunner, StepTiming
from ._logging import log


async def call_step(
    runner: StepRunner,
    loop: Any,
    loop_idx: int,
    step_idx: int,
    name: str,
    timing: StepTiming,
) -> tuple[Any, int, tuple[BaseException, ...]]:
    """Run step ``name`` of loop ``loop_idx``; return its output, attempts and retried errors.

    A failed attempt is tried again while the step's retries allow and its error is one the step's
    ``retry_on`` names; the engine's control errors (terminate, resume, withdraw) never are.
    """
    options = runner.options[name]
    timeout, retries = runner.timeouts[name], runner.retries[name]
    func = getattr(loop, name)
    prev_out = loop.loop_prev_out[loop_idx]
    retried: list[BaseException] = []
    while True:
        try:
            if timeout is None:
                output = await runner.call(loop_idx, step_idx, name, func, prev_out, timing)
            else:
                with anyio.move_on_after(timeout) as scope:
                    output = await runner.call(loop_idx, step_idx, name, func, prev_out, timing)
                if scope.cancelled_caught:
                    raise StepTimeoutError(name, timeout)
            return output, len(retried) + 1, tuple(retried)
        except Exception as exc:
            if len(retried) >= retries or not isinstance(exc, options.retry_on):
                raise
            if isinstance(exc, runner.never_retried):
                raise
            retried.append(exc)
            delay = options.backoff * options.backoff_factor ** (len(retried) - 1)
            log.warning(
                "loop %d step %s failed (%r); attempt %d of %d in %.3gs",
                loop_idx,
                name,
                exc,
                len(retried) + 1,
                retries + 1,
                delay,
                extra={"loop_idx": loop_idx, "step_name": name},
            )
            await anyio.sleep(delay)
