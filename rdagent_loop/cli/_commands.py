"""The click commands: arguments and options in, one call to do the work, exit status out."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import Question, __version__, answer, parse_duration, pending_questions
from .._budget import check_amount
from .._inspect import (
    SessionError,
    SessionPaths,
    import_loop_class,
    read_meta,
    read_session,
    session_paths,
)
from .._session import qualified_name
from .._timeline import ColorBy, render_svg
from ._demo import import_demo, run_demo
from ._driver import RunOptions, require_backend
from ._messages import CliError, error_line, plural, prog, shown
from ._render import render_questions, render_table, short_payload, write_png
from ._start import construct, resume, start

F = TypeVar("F", bound=Callable[..., Any])

_RUN_OPTIONS = frozenset(f.name for f in dataclasses.fields(RunOptions))


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value, name=f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(str(exc).replace(f"--{param.name} ", ""), ctx, param) from None


def _cost(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return check_amount(float(value), "--cost", infinite=True)
    except ValueError:
        raise click.BadParameter(
            f"must be a number >= 0 (or inf, for no limit), got {value!r}", ctx, param
        ) from None


def _run_options(func: F) -> F:
    """The budget and display options of every command that runs loops (:class:`RunOptions`)."""
    options = [
        click.option(
            "--loop-n",
            "--loops",
            "loop_n",
            type=click.IntRange(min=0),
            help="Loops to admit (unfinished loops of a resumed session count first).",
        ),
        click.option(
            "--step-n",
            "--steps",
            "step_n",
            type=click.IntRange(min=0),
            help="Stop after exactly this many steps (the session stays resumable).",
        ),
        click.option(
            "--timeout",
            callback=_duration,
            metavar="DURATION",
            help="Stop after this long: 90s, 30m, 2h, 1d or seconds.",
        ),
        click.option(
            "--cost",
            callback=_cost,
            metavar="AMOUNT",
            help="Stop once the steps have charged this much (loop.charge): the session's "
            "total, so what earlier runs spent counts; inf for no limit.",
        ),
        click.option(
            "--parallel",
            type=click.IntRange(min=1),
            help="Loops in flight at once (the step_semaphore).",
        ),
        click.option(
            "--backend",
            type=click.Choice(["asyncio", "trio"]),
            default="asyncio",
            show_default=True,
            callback=_backend,
            help="The event loop to run on.",
        ),
        click.option(
            "--no-progress",
            is_flag=True,
            help="Plain lines instead of the live display, even on a terminal.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Show every step and the engine's log."),
        _debug_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(dict)["debug"] = True


def _debug_option(func: F) -> F:
    """``--debug`` on the group and on every command, so it works before or after the name."""
    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_set_debug,
        help="Show the traceback of an error.",
    )(func)


def _debug(ctx: click.Context) -> bool:
    return bool((ctx.obj or {}).get("debug"))


def _backend(ctx: click.Context, param: click.Parameter, value: str) -> str:
    require_backend(value)  # before anything is created: no empty session folder
    return value


def _class_option(func: F) -> F:
    return click.option(
        "--class",
        "loop_class",
        metavar="MODULE:CLASS",
        help="The loop class, for a session not started by this command.",
    )(func)


class _Commands(click.Group):
    """The commands; ``demo`` is built when asked for, from the example it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "demo"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "demo":
            return _demo_command()
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="rdagent-loop")
@_debug_option
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Run, watch, stop, inspect and resume R&D loops (rdagent_loop)."""
    ctx.ensure_object(dict)


@cli.command()
@click.argument("target", metavar="MODULE:CLASS")
@_run_options
@click.option(
    "--trace-path",
    type=click.Path(path_type=Path),
    help="Where the session goes (default: ./log/<date-time>).",
)
@click.pass_context
def run(ctx: click.Context, /, target: str, trace_path: Path | None, **options: Any) -> int:
    """Start a run of the LoopBase subclass MODULE:CLASS, with a live display.

    MODULE is imported from the current folder too, like `python -m`.
    """
    try:
        cls = import_loop_class(target)
    except SessionError as exc:
        raise CliError(str(exc)) from exc
    return start(
        construct(cls),
        qualified_name(cls),
        trace_path,
        RunOptions(**options),
        debug=_debug(ctx),
    )


@cli.command("resume")
@click.argument("session", type=click.Path(path_type=Path))
@click.option(
    "--checkout",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Fork: continue in PATH and leave SESSION untouched.",
)
@_class_option
@_run_options
@click.pass_context
def resume_command(
    ctx: click.Context,
    /,
    session: Path,
    checkout: Path | None,
    loop_class: str | None,
    **options: Any,
) -> int:
    """Continue SESSION (a trace path, its __session__ folder, or one snapshot file).

    From a folder it continues from the newest valid snapshot; from a snapshot file it
    continues from that step and deletes the snapshots written after it (or forks, with
    --checkout). Budgets left out keep what the session saved.
    """
    try:
        return resume(session, checkout, loop_class, RunOptions(**options), debug=_debug(ctx))
    except SessionError as exc:
        raise CliError(str(exc)) from exc


@cli.command("inspect")
@click.argument("session", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for scripts.")
@_class_option
@_debug_option
def inspect_command(session: Path, as_json: bool, loop_class: str | None) -> int:
    """Show every loop x step of SESSION: status, duration, cost, result, errors, corrupt
    snapshots, and the steps in progress: the questions they wait on, the calls they memoized."""
    try:
        report, _ = read_session(session, loop_class)
    except SessionError as exc:
        raise CliError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        width = shutil.get_terminal_size((140, 24)).columns
        for line in render_table(report, width):
            click.echo(line)
    return 1 if report.problem else 0


@cli.command()
@click.argument("session", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("timeline.svg"),
    show_default=True,
    help="The chart: .svg (self-contained) or .png (needs Chromium).",
)
@click.option("--width", type=click.IntRange(600, 20000), default=1200, show_default=True)
@click.option("--title", help="A title instead of the class and folder name.")
@click.option(
    "--color-by",
    type=click.Choice(["step", "cost"]),
    default="step",
    show_default=True,
    help="Colour each step by its name, or by what it charged (pale: cheapest, dark: dearest).",
)
@_class_option
@_debug_option
def timeline(
    session: Path,
    output: Path,
    width: int,
    title: str | None,
    color_by: ColorBy,
    loop_class: str | None,
) -> int:
    """Draw every step of every loop of SESSION over time: where the time went (or, with
    --color-by cost, the money)."""
    try:
        report, loop = read_session(session, loop_class)
    except SessionError as exc:
        raise CliError(str(exc)) from exc
    if loop is None and report.problem is not None:
        raise CliError(f"cannot chart {shown(session)}: {report.problem}")
    svg = render_svg(report, width=width, title=title, color_by=color_by)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".png":
        write_png(svg, output)
    else:
        output.write_text(svg)
    steps = sum(1 for row in report.loops for s in row.steps if s.started_at)
    click.echo(
        f"wrote {shown(output)}: {plural(len(report.loops), 'loop')}, {plural(steps, 'step')}"
    )
    return 0


def _questions_folder(session: Path, loop_class: str | None) -> SessionPaths:
    """Where SESSION's questions are; the loop's module imported, for their payloads."""
    try:
        paths = session_paths(session)
    except SessionError as exc:
        raise CliError(str(exc)) from exc
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the loop class's module, like `python -m`
    name = loop_class or read_meta(paths.trace_path).get("loop_class")
    if name:
        try:
            import_loop_class(name)
        except SessionError as exc:
            if loop_class is not None:
                raise CliError(str(exc)) from exc
            # the meta file's class is gone: payloads of plain types still read
    return paths


def _open_questions(paths: SessionPaths) -> list[Question]:
    """The open questions of the session; a payload that cannot be read is a clear error."""
    try:
        return pending_questions(paths.session_folder)
    except Exception as exc:
        raise CliError(
            f"cannot read the questions of {shown(paths.trace_path)}: {error_line(exc)} "
            "(run this where the loop's module is importable, or name its class with "
            "--class MODULE:CLASS)"
        ) from exc


@cli.command("questions")
@click.argument("session", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the questions as JSON, for scripts.")
@_class_option
@_debug_option
def questions_command(session: Path, as_json: bool, loop_class: str | None) -> int:
    """List the open questions of SESSION (a trace path or its __session__ folder): the
    steps in progress that wait for an answer (loop.ask)."""
    paths = _questions_folder(session, loop_class)
    questions = _open_questions(paths)
    if as_json:
        click.echo(json.dumps([_question_json(q) for q in questions], indent=2))
    else:
        for line in render_questions(questions, paths.trace_path):
            click.echo(line)
    return 0


def _question_json(question: Question) -> dict[str, Any]:
    payload: Any
    try:
        payload = json.loads(json.dumps(question.payload, allow_nan=False))
    except (TypeError, ValueError):
        payload = None  # not JSON: its repr is in payload_repr
    return {
        "id": question.id,
        "loop_idx": question.loop_idx,
        "step_idx": question.step_idx,
        "step_name": question.step_name,
        "question": question.question,
        "payload": payload,
        "payload_repr": short_payload(question.payload),
        "asked_at": question.asked_at.isoformat(),
    }


def _json_value(ctx: click.Context, param: click.Parameter, value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not JSON ({exc}); a string needs JSON's quotes too: "
            """'"yes"' (numbers, true, false, null, lists and objects as they are)""",
            ctx,
            param,
        ) from None


@cli.command("answer", context_settings={"ignore_unknown_options": True})
@click.argument("session", type=click.Path(path_type=Path))
@click.argument("question_id", metavar="ID")
@click.argument("value", metavar="VALUE", callback=_json_value)
@_class_option
@_debug_option
def answer_command(session: Path, question_id: str, value: Any, loop_class: str | None) -> int:
    """Answer the open question ID of SESSION with VALUE, a JSON value: '"yes"', 3,
    '{"edit": "a better idea"}', null.

    A run of the session takes the answer within a second; if none is going, the run
    that resumes the session does. List the open questions with `questions`.
    """
    paths = _questions_folder(session, loop_class)
    asked = next((q for q in _open_questions(paths) if q.id == question_id), None)
    try:
        if asked is None:
            raise KeyError(question_id)
        answer(paths.session_folder, question_id, value)
    except KeyError:
        where = shown(paths.trace_path)
        raise CliError(
            f"no open question {question_id!r} in {where}: unknown, or answered already "
            f"(list the open ones with: {prog()} questions {where})"
        ) from None
    click.echo(
        f"answered {question_id} (loop {asked.loop_idx} step {asked.step_idx} "
        f"{asked.step_name}: {asked.question!r}) with {json.dumps(value)}"
    )
    return 0


@cli.command("check")
@click.argument("session", type=click.Path(path_type=Path))
@_class_option
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Check every snapshot (a resume from a file, or a withdraw, may go back to any).",
)
@_debug_option
def check_command(session: Path, loop_class: str | None, every: bool) -> int:
    """Say what a resume of SESSION would do with today's code, changing nothing: the
    migration it applies (session_version), the steps inserted, removed or renamed since
    it was saved, and the step each unfinished loop continues at.

    Loads the newest valid snapshot (or SESSION itself when it names one, or every one
    with --all). Exit status 1 when one would not load, with the reason.
    """
    from ._check import account, check, groups, short, snapshots_to_check, today

    try:
        paths = session_paths(session)
        infos, notes = snapshots_to_check(paths, every)
    except SessionError as exc:
        raise CliError(str(exc)) from exc
    folder = paths.session_folder
    checked = [check(paths, info, loop_class) for info in infos]
    failed = [c for c in checked if c.loop is None]
    name, steps = today(checked, paths, loop_class)
    if not every:
        (c,) = checked
        for text in c.warnings:
            click.echo(f"  warning: {text}", err=True)
        for line in account(c, folder, steps):
            click.echo(line)
        for note in notes:
            click.echo(f"  note: {note}")
        if c.problem is not None:
            raise CliError(f"a resume of {shown(paths.trace_path)} would fail: {c.problem}")
        return 0
    click.echo(
        f"{plural(len(checked), 'snapshot')} of {shown(paths.trace_path)}, with today's "
        f"{name or 'code'}" + (f" (steps {', '.join(steps)})" if steps else "")
    )
    for line in groups(checked):
        click.echo(f"  {line}")
    for c in checked:
        click.echo(f"  {short(c, folder)}")
    if failed:
        raise CliError(
            f"{len(failed)} of {plural(len(checked), 'snapshot')} of "
            f"{shown(paths.trace_path)} would not load with today's code"
        )
    click.echo(f"all {plural(len(checked), 'snapshot')} load with today's code")
    return 0


@cli.command()
@click.argument("session", type=click.Path(path_type=Path))
@_debug_option
def upgrade(session: Path) -> int:
    """Convert SESSION (a trace path or its __session__ folder), written by rdagent_loop 0.1,
    to today's format, in place.

    The old files are kept in __session__/.format2. A session already converted is left as
    it is; a file that cannot be converted is left as it is too, and named.
    """
    from .._errors import SessionBusyError
    from .._session._legacy import upgrade_session

    try:
        folder = session_paths(session).session_folder
    except SessionError as exc:
        raise CliError(str(exc)) from exc
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the loop class's module, like `python -m`
    try:
        report = upgrade_session(folder)
    except (SessionBusyError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    if report.already_current:
        click.echo(f"{shown(folder)} is in today's format already: nothing to convert")
        return 0
    if report.converted:
        click.echo(
            f"converted {plural(len(report.converted), 'step file')} of {shown(folder)}, "
            f"{plural(report.outputs_merged, 'finished-loop outputs file')} merged into them; "
            f"the old files are kept in {shown(report.kept)}"
        )
    elif not report.failed:
        click.echo(
            f"nothing left to convert in {shown(folder)}; removed "
            f"{plural(report.outputs_removed, 'old file')} from its loop folders (the old "
            f"files are kept in {shown(report.kept)})"
        )
    if report.failed:
        failed = "; ".join(f"{file.relative_to(folder)}: {why}" for file, why in report.failed)
        raise CliError(
            f"{plural(len(report.failed), 'step file')} of {shown(folder)} could not be "
            f"converted and stayed as they were (copies in {shown(report.kept)}): {failed}"
        )
    return 0


def _demo_command() -> click.Command:
    """``demo``, with the defaults and options of the example it runs."""
    try:
        demo = import_demo()
    except CliError as exc:  # not in a checkout: the command says so when it is run
        missing = exc

        @click.command("demo")
        @_debug_option
        def unavailable() -> None:
            """Run the data-science example (needs a checkout of rdagent_loop)."""
            raise missing

        return unavailable

    demo_options: Callable[[F], F] = demo.options

    @click.command("demo", help=demo.HELP)
    @_run_options
    @click.option(
        "--trace-path",
        type=click.Path(path_type=Path),
        default=demo.TRACE_PATH,
        show_default=True,
        help="Where the session goes.",
    )
    @click.option(
        "--resume",
        "resume_path",
        type=click.Path(path_type=Path),
        metavar="PATH",
        help="Continue the demo session in PATH instead of starting one.",
    )
    @click.option("--overwrite", is_flag=True, help="Replace a session already in --trace-path.")
    @demo_options
    @click.pass_context
    def command(
        ctx: click.Context,
        /,
        trace_path: Path,
        resume_path: Path | None,
        overwrite: bool,
        **options: Any,
    ) -> int:
        run_options = RunOptions(**{k: v for k, v in options.items() if k in _RUN_OPTIONS})
        loop_options = {k: v for k, v in options.items() if k not in _RUN_OPTIONS}
        try:
            return run_demo(
                demo,
                trace_path,
                resume_path,
                overwrite,
                run_options,
                loop_options,
                debug=_debug(ctx),
            )
        except SessionError as exc:
            raise CliError(str(exc)) from exc

    return command


def main(argv: Sequence[str] | None = None) -> int:
    """The ``rdagent-loop`` command; return the exit status (``__main__`` exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = prog()
    # --debug is accepted by the group and every command; an error raised before or
    # outside a command's body must know it too
    debug = "--debug" in (args[: args.index("--")] if "--" in args else args)
    try:
        status = cli.main(args=args, prog_name=name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        if debug:
            traceback.print_exc()
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        if debug and not isinstance(exc, click.UsageError):
            traceback.print_exc()  # with the error it stands for, as its cause
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see `{exc.ctx.command_path} --help`)"
        click.echo(f"{name}: error: {' '.join(message.split())}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"{name}: error: {error_line(exc)}", err=True)
        return 1
    return status if isinstance(status, int) else 0
