"""Calling a step function with its policies: a timeout per attempt and retries with backoff.

Each attempt has its own view of the step journal (``_journal.StepJournal``, in a context
variable), so ``loop.memo`` and ``loop.ask`` know which loop and step they serve.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import QuestionTimeoutError, StepTimeoutError
from ._executors import StepRunner, StepTiming
from ._journal import AwaitingAnswer, AwaitingSnapshot, Journal, StepJournal, current_step
from ._logging import log
from ._otel import retrying

if TYPE_CHECKING:
    from ._step_limit import StepSlot


async def call_step(
    runner: StepRunner,
    journal: Journal,
    loop: Any,
    loop_idx: int,
    step_idx: int,
    name: str,
    timing: StepTiming,
    slot: StepSlot | None = None,
) -> tuple[Any, int, tuple[BaseException, ...]]:
    """Run step ``name`` of loop ``loop_idx``; return its output, attempts and retried errors.

    A failed attempt is tried again while the step's retries allow and its error is one the step's
    ``retry_on`` names; the engine's control errors (terminate, resume, withdraw) never are.
    """
    options = runner.options[name]
    timeout, retries = runner.timeouts[name], runner.retries[name]
    func = getattr(loop, name)
    is_async = runner.is_async[name]
    prev_out = loop.loop_prev_out[loop_idx]
    retried: list[BaseException] = []
    while True:
        sj = StepJournal(
            journal, loop, loop_idx, step_idx, name, slot, is_async=is_async, timing=timing
        )
        token = current_step.set(sj)
        try:
            if timeout is None:
                output = await runner.call(loop_idx, step_idx, name, func, prev_out, timing)
            else:
                with anyio.move_on_after(timeout) as scope:
                    sj.timeout_scope = scope
                    output = await runner.call(loop_idx, step_idx, name, func, prev_out, timing)
                if scope.cancelled_caught:
                    raise StepTimeoutError(name, timeout)
            return output, len(retried) + 1, tuple(retried)
        except AwaitingSnapshot:
            await sj.settle()  # then the step runs again: nothing was paid for yet
        except AwaitingAnswer as waiting:
            # a sync step on the event loop's thread asked: wait here, then run it again
            with contextlib.suppress(QuestionTimeoutError):  # the step, run again, raises it
                await journal.ask(
                    sj, waiting.k, waiting.text, waiting.payload, waiting.timeout, waiting.default
                )
        except Exception as exc:
            if len(retried) >= retries or not isinstance(exc, options.retry_on):
                raise
            if isinstance(exc, runner.never_retried):
                raise
            retried.append(exc)
            retrying(exc)  # an event on the step's span (OpenTelemetry)
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
        finally:
            sj.close()
            current_step.reset(token)
