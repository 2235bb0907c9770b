"""Running a loop from the command line, and saying how it ended.

The run goes under the chosen backend with the live display beside it; the first Ctrl-C
(or SIGTERM) cancels it, which stops in-flight steps and keeps every saved one. A question
a step asks (``loop.ask``) is shown with the command that answers it from another shell.
The last lines say what happened, what the steps spent (``loop.charge``) against the cost
budget, and what to type next; the exit status tells scripts.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import click
from anyio.abc import TaskStatus

from .. import (
    LoopBase,
    Question,
    RunSummary,
    SessionBusyError,
    StepResult,
    list_snapshots,
    pending_questions,
)
from .._budget import carry_budgets
from .._inspect import META_FILE, spending_of
from .._live import LiveDisplay
from .._session._lock import remove_lock
from .._timeline import format_cost, format_seconds, format_spent
from ._messages import CliError, error_line, plural, prog, shown

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class RunOptions:
    """The command line's budgets and display options (``--loop-n``, ``--backend``, ...)."""

    loop_n: int | None
    step_n: int | None
    timeout: timedelta | None
    parallel: int | None
    backend: str
    no_progress: bool
    verbose: bool
    cost: float | None = None
    """``--cost``: the session's ``all_cost`` budget (what earlier runs spent counts)."""


@dataclass
class _Ended:
    summary: RunSummary | None = None
    error: BaseException | None = None
    signal: int | None = None


async def _watch_signals(
    scope: anyio.CancelScope,
    ended: _Ended,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The first Ctrl-C (or SIGTERM) cancels the run: in-flight steps stop, saved ones stay."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            ended.signal = signum
            scope.cancel(f"stopped by {signal.Signals(signum).name}")
            return


async def _drive(loop: LoopBase, display: LiveDisplay, kwargs: dict[str, Any]) -> _Ended:
    ended = _Ended()
    async with anyio.create_task_group() as tg:
        # started before the run, so a Ctrl-C always finds the watcher
        await tg.start(_watch_signals, tg.cancel_scope, ended)
        tg.start_soon(display.refresh_forever)
        try:
            run = loop.run(**kwargs)
            display.attach(run)
            async with run as results:
                async for item in results:
                    if isinstance(item, StepResult):
                        display.result(item)
                    elif isinstance(item, Question):
                        display.question(item)
            ended.summary = results.summary
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            ended.error = exc
        tg.cancel_scope.cancel("the run ended")
    return ended


class _DisplayLog(logging.Handler):
    """The engine's log lines, printed above the live display.

    Not the engine's warning that a step raised a skip error: the display reports that
    itself, in the loop's one line.
    """

    def __init__(self, display: LiveDisplay) -> None:
        super().__init__()
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if hasattr(record, "loop_idx") and message.endswith(", skipping ahead"):
                return
            self.display.message(f"  {record.levelname.lower()}: {message}")
        except Exception:
            self.handleError(record)


def require_backend(backend: str) -> None:
    """Fail before anything is created when the event loop asked for is not installed."""
    if backend == "trio":
        try:
            importlib.import_module("trio")
        except ImportError:
            raise CliError(
                "--backend trio needs trio, which is not installed: "
                "pip install 'rdagent_loop[trio]'"
            ) from None


def run_with_display(loop: LoopBase, options: RunOptions, *, debug: bool) -> int:
    """Run ``loop`` with a live display; report how it ended; return the exit status."""
    # the budgets the run starts with, by the engine's own rule: for the display's totals
    step_n, loop_n = carry_budgets(loop, step_n=options.step_n, loop_n=options.loop_n)
    before = spending_of(loop)
    cost_limit = options.cost if options.cost is not None or before is None else before.limit
    interactive = sys.stderr.isatty() and not options.no_progress
    display = LiveDisplay(
        loop,
        sys.stderr,
        interactive=interactive,
        step_n=step_n,
        loop_n=loop_n,
        cost_limit=cost_limit,
        verbose=options.verbose,
        answer_with=f"{prog()} answer {shown(loop.session_folder.parent)}",
    )
    level = logging.INFO if options.verbose else logging.WARNING
    engine_log = logging.getLogger("rdagent_loop")
    handler = _DisplayLog(display)
    handler.setLevel(level)
    engine_log.addHandler(handler)
    old_level = engine_log.level
    engine_log.setLevel(level)
    kwargs: dict[str, Any] = {"loop_n": options.loop_n, "step_n": options.step_n}
    if options.timeout is not None:
        kwargs["all_duration"] = options.timeout
    if options.cost is not None:
        kwargs["all_cost"] = options.cost
    started = time.monotonic()
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.simplefilter("default")

            def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
                display.message(f"  warning: {message}")

            warnings.showwarning = show
            ended = anyio.run(_drive, loop, display, kwargs, backend=options.backend)
    finally:
        display.close()
        engine_log.removeHandler(handler)
        engine_log.setLevel(old_level)
    spent_before = (before.cost, before.tokens) if before is not None else (0.0, 0)
    return _report(
        loop, ended, display.steps_done, time.monotonic() - started, spent_before, debug=debug
    )


def _report(
    loop: LoopBase,
    ended: _Ended,
    steps_done: int,
    seconds: float,
    spent_before: tuple[float, int],
    *,
    debug: bool,
) -> int:
    """The end-of-run lines: how it ended, what it spent, where the session is, what to
    type next.

    Commands to resume or inspect are given only when a snapshot was saved: without one
    there is nothing they could read.
    """
    if isinstance(ended.error, SessionBusyError):  # another run's session: leave it as it is
        if debug:
            traceback.print_exception(ended.error)
        click.echo(f"{prog()}: error: {error_line(ended.error)}", err=True)
        return 1
    trace = loop.session_folder.parent
    resume = f"{prog()} resume {shown(trace)}"
    saved = sum(1 for s in list_snapshots(loop.session_folder) if s.valid)
    if not saved:
        _forget(trace)
    nothing = (
        "no snapshot was saved (save_snapshots is off), so there is nothing to resume"
        if steps_done
        else "no step completed, so nothing was saved and there is nothing to resume"
    )
    if ended.signal is not None:
        signum = signal.Signals(ended.signal)
        how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signum.name
        if not saved:
            click.echo(f"interrupted by {how} after {plural(steps_done, 'step')}: {nothing}.")
            return EXIT_STATUS.get(signum, 1)
        click.echo(
            f"interrupted by {how} after {plural(steps_done, 'step')}: stopped cleanly; "
            f"the session in {shown(trace)} keeps every completed step "
            f"({plural(saved, 'snapshot')})."
        )
        _spent(loop, None, spent_before)
        click.echo(f"resume with: {resume}")
        _still_open(loop)
        return EXIT_STATUS.get(signum, 1)
    if ended.error is not None:
        if debug:
            traceback.print_exception(ended.error)
        click.echo(f"{prog()}: error: {error_line(ended.error)}", err=True)
        if saved:
            click.echo(
                f"the session in {shown(trace)} keeps every completed step; resume with: {resume}",
                err=True,
            )
        else:
            click.echo(f"{nothing}.", err=True)
        return 1
    summary = ended.summary
    assert summary is not None
    click.echo(f"finished: {summary} in {format_seconds(seconds)}")
    _spent(loop, (summary.cost, summary.tokens), spent_before)
    if not saved:
        click.echo(f"nothing ran: {nothing}." if not steps_done else f"{nothing}.")
        return 0
    best = getattr(loop, "best", None)
    if best is not None and not callable(best):
        click.echo(f"best: {best}")
    click.echo(f"session: {shown(trace)} ({plural(saved, 'snapshot')})")
    unfinished = loop.get_unfinished_loop_cnt(loop.loop_idx)
    if summary.reason == "all_cost":
        spending = spending_of(loop)
        more = more_budget(spending.limit, spending.cost) if spending else None
        click.echo(
            "the cost budget is spent; resume with a larger one (--cost caps the session's "
            f"total, what it spent so far included): {resume} --cost {more or 'AMOUNT'}"
        )
        _still_open(loop)
    elif unfinished or summary.reason in ("step_n", "all_duration"):
        click.echo(f"resume with: {resume}")
        _still_open(loop)
    else:
        click.echo(f"run more loops with: {resume} --loop-n 4")
    click.echo(
        f"inspect with: {prog()} inspect {shown(trace)}; "
        f"chart: {prog()} timeline {shown(trace)} -o timeline.svg"
    )
    return 0


def _spent(
    loop: LoopBase, this_run: tuple[float, int] | None, spent_before: tuple[float, int]
) -> None:
    """What this run spent, the session's total and the budget left; nothing when no step
    ever charged and no budget is set. ``this_run``: the run's summary's, when it ended."""
    spending = spending_of(loop)
    if spending is None:
        return
    if this_run is None:  # stopped before its summary: what the session's total grew by
        this_run = (
            max(0.0, spending.cost - spent_before[0]),
            max(0, spending.tokens - spent_before[1]),
        )
    if not (any(this_run) or spending.cost or spending.tokens or spending.left is not None):
        return
    click.echo(
        f"spent: {format_cost(this_run[0])} ({this_run[1]:,} tokens) in this run; the "
        f"session's total {format_spent(spending.cost, spending.tokens, spending.limit)}"
    )


def more_budget(limit: float | None, spent: float) -> str | None:
    """A ``--cost`` to suggest once ``limit`` is spent: about twice the budget (and more
    than what was spent), rounded up to two significant digits; None when both are 0."""
    amount = max(2 * (limit or 0.0), 2 * spent)
    if not math.isfinite(amount) or amount <= 0:
        return None
    unit = 10.0 ** (math.floor(math.log10(amount)) - 1)
    return f"{math.ceil(round(amount / unit, 9)) * unit:g}"


def _still_open(loop: LoopBase) -> None:
    """Say which questions are still open: they are asked again when the run resumes, and
    an answer given meanwhile is taken at once."""
    try:
        questions = pending_questions(loop.session_folder)
    except Exception:  # a payload this process cannot read, say: only a hint is lost
        return
    if questions:
        trace = shown(loop.session_folder.parent)
        click.echo(
            f"{plural(len(questions), 'question')} still open (answered now, the resume "
            f"takes the answer at once): {prog()} questions {trace}"
        )


def _forget(trace: Path) -> None:
    """Take back what starting the run created, when it saved nothing: the meta file, the
    session's lock, and the session folders if they are left empty (the app's own files
    stay)."""
    (trace / META_FILE).unlink(missing_ok=True)
    remove_lock(trace / "__session__")
    for folder in (trace / "__session__", trace):
        with contextlib.suppress(OSError):  # not empty, or not there
            folder.rmdir()
