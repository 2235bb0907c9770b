"""``python -m examples.quant_factor``: mine factors at a terminal, a person approving them.

    python -m examples.quant_factor --ask --loop-n 5        # approve, edit or reject each factor
    python -m examples.quant_factor --resume                 # continue the session after a stop
    python -m examples.quant_factor --cost 0.02              # stop once $0.02 is spent

Run it from the repository root, so that ``examples`` is importable. Without ``--ask`` it is
the plain loop (``rdagent-loop run examples.quant_factor:FactorLoop`` runs it too, with a
live display; its questions, if the session asks, are answered with ``rdagent-loop answer``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import click
from anyio.abc import TaskStatus

from rdagent_loop import (
    LoopRun,
    LoopSettings,
    RunSummary,
    list_snapshots,
    parse_duration,
    pending_questions,
)

from .loop import FactorLoop
from .terminal import replay_line, run_at_terminal, stdin_lines

COMMAND = "python -m examples.quant_factor"


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value, name="--timeout")
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


async def _watch_signals(
    scope: anyio.CancelScope,
    stopped: list[str],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The first Ctrl-C (or SIGTERM) stops the run: in-flight steps stop, saved ones stay."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            stopped.append(signal.Signals(signum).name)
            scope.cancel(f"stopped by {signal.Signals(signum).name}")
            return


async def _drive(
    run: LoopRun, loop: FactorLoop, session: Path, stopped: list[str]
) -> RunSummary | None:
    summary = None
    async with anyio.create_task_group() as tg:
        await tg.start(_watch_signals, tg.cancel_scope, stopped)
        async with contextlib.AsyncExitStack() as stack:
            # stdin is read only when someone is to be asked
            lines = await stack.enter_async_context(stdin_lines()) if loop.ask_person else None
            summary = await run_at_terminal(run, session, click.echo, lines)
        tg.cancel_scope.cancel("the run ended")
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--ask/--no-ask",
    default=None,
    help="A person approves, edits or rejects every proposed factor (a resumed session "
    "keeps its choice unless told).",
)
@click.option("--loop-n", type=click.IntRange(min=0), help="Loops to admit (default: 5).")
@click.option("--step-n", type=click.IntRange(min=0), help="Stop after this many steps.")
@click.option("--timeout", callback=_duration, metavar="DURATION", help="Stop after 90s, 30m...")
@click.option(
    "--cost",
    type=click.FloatRange(min=0),
    help="Stop once the model calls have cost this much, in dollars (the session's total).",
)
@click.option("--parallel", type=click.IntRange(min=1), help="Loops in flight (default: 1).")
@click.option("--backend", type=click.Choice(["asyncio", "trio"]), default="asyncio")
@click.option(
    "--trace-path",
    type=click.Path(path_type=Path),
    default=Path("quant-session"),
    show_default=True,
    help="Where the session goes.",
)
@click.option("--resume", is_flag=True, help="Continue the session in --trace-path.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of market and 'LLM'.")
@click.option(
    "--llm-latency",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Seconds the stand-in LLM takes to answer.",
)
def main(
    ask: bool | None,
    loop_n: int | None,
    step_n: int | None,
    timeout: timedelta | None,
    cost: float | None,
    parallel: int | None,
    backend: str,
    trace_path: Path,
    resume: bool,
    seed: int,
    llm_latency: float,
) -> None:
    """Mine factors on generated prices; with --ask, a person approves each one."""
    trace = trace_path.absolute()
    if resume:
        if not list_snapshots(trace / "__session__"):
            raise click.ClickException(
                f"nothing to resume in {trace_path}: no step completed there. Start it again "
                "with the options it had: the step in progress gets what it paid for and was "
                "told (the journal)"
            )
        loop = FactorLoop.load(trace, checkout=True)
        update: dict[str, Any] = {"progress": False}
        if parallel is not None:
            update["step_semaphore"] = parallel
        loop.settings = loop.settings.model_copy(update=update)
        if ask is not None:
            loop.ask_person = ask
    else:
        if list_snapshots(trace / "__session__"):
            raise click.ClickException(
                f"{trace_path} already holds a session: continue it with --resume, "
                "or choose another --trace-path"
            )
        settings = LoopSettings(trace_path=trace, progress=False, step_semaphore=parallel or 1)
        loop = FactorLoop(settings, seed=seed, llm_latency=llm_latency, ask_person=bool(ask))
        if loop_n is None and step_n is None and timeout is None and cost is None:
            loop_n = 5
    run = loop.run(step_n=step_n, loop_n=loop_n, all_duration=timeout, all_cost=cost)
    click.echo(
        f"{'resuming' if resume else 'running'} the factor loop in {trace_path}, "
        f"{loop.settings.max_parallel} in parallel, on {backend}"
        + ("; every factor is put to you" if loop.ask_person else "")
    )
    stopped: list[str] = []
    summary = anyio.run(_drive, run, loop, trace_path, stopped, backend=backend)
    if stopped:
        click.echo(f"stopped by {stopped[0]}: every completed step is saved")
    elif summary is not None:
        click.echo(f"finished: {summary}")
    if loop.best is not None:
        click.echo(f"best: {loop.best}")
    if resume:
        click.echo(replay_line(run.statistics()))
    open_questions = []
    with contextlib.suppress(FileNotFoundError):  # nothing was saved
        open_questions = pending_questions(trace)
    if open_questions:
        click.echo(
            f"{len(open_questions)} question(s) still open: answer them now with rdagent-loop "
            f"answer {trace_path} ID JSON, and the resume takes the answers at once"
        )
    spending = loop.spending
    if spending.cost:
        limit = f" of ${spending.limit:g}" if spending.limit not in (None, float("inf")) else ""
        click.echo(f"the model calls of the session cost ${spending.cost:.4f}{limit}")
    if stopped or (summary is not None and summary.reason != "loop_n"):
        if list_snapshots(trace / "__session__"):
            more = ""
            if summary is not None and summary.reason == "all_cost":
                more = f" --cost {2 * max(spending.limit or 0.0, spending.cost):.2g}"
            click.echo(f"resume with: {COMMAND} --resume --trace-path {trace_path}{more}")
        else:
            click.echo(
                "no step completed, so there is nothing to resume: run the same command again "
                "(the step in progress gets what it paid for and was told)"
            )
    if stopped:
        sys.exit(130 if stopped[0] == "SIGINT" else 143)


if __name__ == "__main__":
    main()
