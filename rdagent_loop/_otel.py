"""OpenTelemetry traces of a run (DESIGN §3.5), when ``opentelemetry-api`` is importable.

A run is a span (``rdagent_loop.run``); each loop is a child of it (``rdagent_loop.loop``,
from the loop's first step in this run to its last one, or to the run's end), each step a
child of its loop (``rdagent_loop.step``). The step's span is the current span while the
step's code runs: in the engine's task (async and inline steps), in the step's thread (AnyIO
copies the context into it), and in a worker process or Ray task, which attaches the W3C
trace context the task carries (:func:`carrier`, :func:`attached`). So spans the step's own
code opens (an LLM client's instrumentation) nest under it. Questions, answers, withdraws
and the run's stop are span events.

Spans go to the global tracer provider, which the application sets; nothing here sets one.
Without OpenTelemetry nothing is imported: the run keeps :data:`NO_TRACE`, whose hooks do
nothing, and a run whose provider records nothing (none is set) keeps it too.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio

from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._results import Question, RunSummary, StepResult
    from ._run import Run

LOOP_IDX = "rdagent_loop.loop_idx"
STEP_IDX = "rdagent_loop.step_idx"
STEP_NAME = "rdagent_loop.step_name"
ATTEMPTS = "rdagent_loop.attempts"
EXECUTOR = "rdagent_loop.executor"
COST = "rdagent_loop.cost"
TOKENS = "rdagent_loop.tokens"
QUESTION_ID = "rdagent_loop.question_id"

_NULL: AbstractContextManager[None] = nullcontext()
_importable: bool | None = None  # whether `opentelemetry` can be imported: looked up once
_provider: TracerProvider | None = None  # for tests: a provider instead of the global one


def available() -> bool:
    """Whether OpenTelemetry can be imported (looked up once, importing nothing)."""
    global _importable
    if _importable is None:
        try:
            _importable = importlib.util.find_spec("opentelemetry") is not None
        except (ImportError, ValueError):
            _importable = False
    return _importable


class RunTrace:
    """The trace hooks of a run nobody traces: each does nothing. A run holds this one
    (:data:`NO_TRACE`) unless :func:`trace_run` traces it."""

    __slots__ = ()

    def step(
        self, loop_idx: int, step_idx: int, name: str, timing: object
    ) -> AbstractContextManager[object]:
        """A context manager around one step's attempts: the step's span, current inside."""
        return _NULL

    def step_recorded(self, result: StepResult, *, loop_done: bool) -> None:
        """The step's result is recorded: its span ends, and its loop's once the loop is done."""

    def asked(self, question: Question) -> None:
        """A step asked a question (journaled, about to be delivered)."""

    def answered(self, question: Question, meta: Mapping[str, Any]) -> None:
        """A question got its answer (or its timeout's outcome), journaled."""

    def withdrew(self, loop_idx: int, error: BaseException, restored: str | None) -> None:
        """A withdraw restored ``restored`` (None: the run's start) after ``error``."""

    def stopped(self, summary: RunSummary) -> None:
        """The run stopped, for ``summary.reason``."""


NO_TRACE = RunTrace()

_step: ContextVar[_StepSpan | None] = ContextVar("rdagent_loop_otel_step", default=None)


def trace_run(run: Run) -> AbstractContextManager[object]:
    """Trace ``run`` while the block runs: its span is current, its ``otel`` emits spans."""
    return _TracedRun(run) if available() else _NULL


class _LoopSpan:
    __slots__ = ("context", "cost", "span", "tokens")

    def __init__(self, span: Span, context: Context) -> None:
        self.span = span
        self.context = context  # the loop's span in the run's context: its steps' parent
        self.cost = 0.0
        self.tokens = 0


class _TracedRun(RunTrace):
    """A traced run: the run's span (a context manager around the run) and its hooks."""

    __slots__ = (
        "_attach",
        "_context",
        "_detach",
        "_in_context",
        "_loops",
        "_run",
        "_span",
        "_steps",
        "_token",
        "_tracer",
    )

    def __init__(self, run: Run) -> None:
        self._run = run
        self._span: Span | None = None
        self._loops: dict[int, _LoopSpan] = {}
        self._steps: dict[tuple[int, int], _StepSpan] = {}

    def __enter__(self) -> None:
        global _importable
        try:
            from opentelemetry import context, trace
        except ImportError:  # a namespace `opentelemetry` without the API
            _importable = False
            return
        run = self._run
        self._tracer: Tracer = trace.get_tracer("rdagent_loop", __version__, _provider)
        span = self._tracer.start_span(
            "rdagent_loop.run", attributes={"rdagent_loop.loop_class": type(run.loop).__name__}
        )
        if not span.get_span_context().is_valid:
            return  # no tracer provider is set: nothing would be recorded or carried
        self._span = span
        self._attach, self._detach = context.attach, context.detach
        self._in_context = trace.set_span_in_context
        self._context = self._in_context(span)
        self._token = self._attach(self._context)
        run.otel = self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if span is None:
            return
        self._run.otel = NO_TRACE
        for step in self._steps.values():  # steps whose result was never recorded
            step.span.end()
        for loop in self._loops.values():  # loops still unfinished
            loop.span.end()
        if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
            _failed(span, exc)
        span.end()
        self._detach(self._token)

    # -- hooks ----------------------------------------------------------------------------

    def step(self, loop_idx: int, step_idx: int, name: str, timing: object) -> _StepSpan:
        return _StepSpan(self, loop_idx, step_idx, name, timing)

    def step_recorded(self, result: StepResult, *, loop_done: bool) -> None:
        li = result.loop_idx
        step = self._steps.pop((li, result.step_idx), None)
        cost, tokens = _spent(result)
        if step is not None:
            step.span.set_attributes({ATTEMPTS: result.attempts, COST: cost, TOKENS: tokens})
            step.span.end()
        loop = self._loops.get(li)
        if loop is not None:
            loop.cost += cost
            loop.tokens += tokens
            if loop_done:
                del self._loops[li]
                loop.span.set_attributes({COST: loop.cost, TOKENS: loop.tokens})
                loop.span.end()

    def asked(self, question: Question) -> None:
        self._span_of(question.loop_idx, question.step_idx).add_event(
            "rdagent_loop.question",
            {
                QUESTION_ID: question.id,
                "rdagent_loop.question": question.question,
                LOOP_IDX: question.loop_idx,
                STEP_IDX: question.step_idx,
                STEP_NAME: question.step_name,
            },
        )

    def answered(self, question: Question, meta: Mapping[str, Any]) -> None:
        self._span_of(question.loop_idx, question.step_idx).add_event(
            "rdagent_loop.answer",
            {QUESTION_ID: question.id, "rdagent_loop.timed_out": bool(meta.get("timed_out"))},
        )

    def withdrew(self, loop_idx: int, error: BaseException, restored: str | None) -> None:
        attributes: dict[str, str | int] = {
            LOOP_IDX: loop_idx,
            "exception.type": _type_name(error),
            "exception.message": str(error),
            "rdagent_loop.restored": restored or "the run's start",
        }
        assert self._span is not None
        self._span.add_event("rdagent_loop.withdraw", attributes)
        # the loop starts again from before its first step: its next steps get a new span
        loop = self._loops.pop(loop_idx, None)
        if loop is not None:
            loop.span.add_event("rdagent_loop.withdraw", attributes)
            loop.span.end()

    def stopped(self, summary: RunSummary) -> None:
        span = self._span
        assert span is not None
        span.add_event("rdagent_loop.stop", {"rdagent_loop.reason": summary.reason})
        cost, tokens = _spent(summary)
        span.set_attributes(
            {
                "rdagent_loop.steps": summary.steps,
                "rdagent_loop.loops": summary.loops,
                COST: cost,
                TOKENS: tokens,
            }
        )

    # -- spans ----------------------------------------------------------------------------

    def loop_context(self, loop_idx: int) -> Context:
        """The context of loop ``loop_idx``'s span, started with its first step in this run."""
        loop = self._loops.get(loop_idx)
        if loop is None:
            span = self._tracer.start_span(
                "rdagent_loop.loop", self._context, attributes={LOOP_IDX: loop_idx}
            )
            loop = self._loops[loop_idx] = _LoopSpan(span, self._in_context(span, self._context))
        return loop.context

    def _span_of(self, loop_idx: int, step_idx: int) -> Span:
        """The span of that step while it runs, else of its loop, else the run's."""
        step = self._steps.get((loop_idx, step_idx))
        if step is not None:
            return step.span
        loop = self._loops.get(loop_idx)
        if loop is not None:
            return loop.span
        assert self._span is not None
        return self._span


class _StepSpan:
    """One step's span: current while its attempts run; ended by the run when its result is
    recorded, or here when it fails (a skip error's result is still recorded) or is
    cancelled."""

    __slots__ = ("_tokens", "attempts", "key", "name", "run", "span", "timing")

    def __init__(
        self, run: _TracedRun, loop_idx: int, step_idx: int, name: str, timing: object
    ) -> None:
        self.run = run
        self.key = (loop_idx, step_idx)
        self.name = name
        self.timing = timing
        self.attempts = 1

    def __enter__(self) -> None:
        run = self.run
        li, si = self.key
        self.span = run._tracer.start_span(
            "rdagent_loop.step",
            run.loop_context(li),
            attributes={
                LOOP_IDX: li,
                STEP_IDX: si,
                STEP_NAME: self.name,
                EXECUTOR: run._run.runner.choice.get(self.name, "inline"),
            },
        )
        run._steps[self.key] = self
        self._tokens = (run._attach(run._in_context(self.span)), _step.set(self))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run = self.run
        context_token, step_token = self._tokens
        _step.reset(step_token)
        run._detach(context_token)
        if exc is None:
            return  # it ends when the result is recorded, with the attempts and the cost
        span = self.span
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            span.set_attribute("rdagent_loop.cancelled", True)
        else:
            _failed(span, exc)
            skip = run._run.loop.skip_loop_error
            if isinstance(exc, Exception) and isinstance(exc, skip):
                return  # its result (the skip) is recorded next
        cost, tokens = _spent(self.timing)
        span.set_attributes({ATTEMPTS: self.attempts, COST: cost, TOKENS: tokens})
        run._steps.pop(self.key, None)
        span.end()


def retrying(error: BaseException) -> None:
    """The current step's attempt failed with ``error`` and the step is tried again."""
    step = _step.get()
    if step is not None:
        step.span.add_event(
            "rdagent_loop.retry",
            {
                "exception.type": _type_name(error),
                "exception.message": str(error),
                "rdagent_loop.attempt": step.attempts,
            },
        )
        step.attempts += 1


# -- worker processes and Ray tasks ----------------------------------------------------------


def carrier() -> dict[str, str] | None:
    """The trace context of the step running in this task (W3C ``traceparent``...), for a
    worker to attach; None when the step is not traced."""
    if _step.get() is None:
        return None
    from opentelemetry import propagate

    found: dict[str, str] = {}
    propagate.inject(found)
    return found


def attached(found: Mapping[str, str] | None) -> AbstractContextManager[object]:
    """In a worker: the step's span (from its :func:`carrier`) is current inside; on the way
    out the worker's spans are flushed, as the pool may kill the worker once it replies."""
    return _attached(found) if found and available() else _NULL


@contextmanager
def _attached(found: Mapping[str, str]) -> Iterator[None]:
    from opentelemetry import context, propagate, trace

    token = context.attach(propagate.extract(found))
    try:
        yield
    finally:
        context.detach(token)
        flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if flush is not None:
            flush(_FLUSH_MILLIS)


_FLUSH_MILLIS = 5000


# -- helpers ---------------------------------------------------------------------------------


def _failed(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(error, escaped=True)
    span.set_status(Status(StatusCode.ERROR, f"{_type_name(error)}: {error}"))


def _spent(record: object) -> tuple[float, int]:
    """Cost and tokens of a result, summary or step timing (0 where none are reported)."""
    return float(getattr(record, "cost", 0.0) or 0.0), int(getattr(record, "tokens", 0) or 0)


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
