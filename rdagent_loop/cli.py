"""``rdagent-loop``: run, watch, stop, inspect, resume and chart R&D loops from a shell.

    rdagent-loop run examples.data_science.loop:DataScienceLoop --loop-n 8 --parallel 3
    rdagent-loop inspect log/2025-01-01_12-00-00-000000
    rdagent-loop resume log/2025-01-01_12-00-00-000000 [--checkout forked/]
    rdagent-loop timeline log/2025-01-01_12-00-00-000000 -o timeline.svg
    rdagent-loop demo

Ctrl-C stops a run cleanly (in-flight steps are cancelled, their child processes killed,
every completed step is already saved) and says how to resume. Errors are one line on
standard error and a non-zero exit status; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import click

from . import LoopBase, LoopSettings, RunSummary, Timer, __version__, list_snapshots, parse_duration
from ._inspect import (
    SessionError,
    SessionReport,
    import_loop_class,
    load_loop,
    newest_valid,
    qualified_name,
    read_meta,
    read_session,
    resolve,
    write_meta,
)
from ._live import LiveDisplay
from ._timeline import format_seconds, render_svg

F = TypeVar("F", bound=Callable[..., Any])

DEMO_CLASS = "examples.data_science.loop:DataScienceLoop"
DEMO_TRACE_PATH = "./demo-session"
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class CliError(click.ClickException):
    """A failure the user can act on: printed as one line, exit status 1."""

    exit_code = 1


def _prog() -> str:
    """How the user called us, so the hints we print can be pasted back."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return (
        "python -m rdagent_loop"
        if argv0.endswith(".py") or argv0 in ("-m", "-c")
        else "rdagent-loop"
    )


def _show(path: Path) -> str:
    """A path as short as it can be and safe to paste into a shell."""
    path = path.absolute()
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return shlex.quote(shown)


# -- shared options -------------------------------------------------------------------------


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value, name=f"--{param.name}")
    except ValueError as exc:
        raise click.BadParameter(str(exc).replace(f"--{param.name} ", ""), ctx, param) from None


def _budget_options(func: F) -> F:
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
            "--parallel",
            type=click.IntRange(min=1),
            help="Loops in flight at once (the step_semaphore).",
        ),
        click.option(
            "--backend",
            type=click.Choice(["asyncio", "trio"]),
            default="asyncio",
            show_default=True,
            help="The event loop to run on.",
        ),
        click.option(
            "--no-progress",
            is_flag=True,
            help="Plain lines instead of the live display, even on a terminal.",
        ),
        click.option("-v", "--verbose", is_flag=True, help="Show every step and the engine's log."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass
class _Budget:
    loop_n: int | None
    step_n: int | None
    timeout: timedelta | None
    parallel: int | None
    backend: str
    no_progress: bool
    verbose: bool


# -- running --------------------------------------------------------------------------------


@dataclass
class _Ended:
    summary: RunSummary | None = None
    error: BaseException | None = None
    signal: int | None = None


async def _watch_signals(scope: anyio.CancelScope, ended: _Ended) -> None:
    """The first Ctrl-C (or SIGTERM) cancels the run: in-flight steps stop, saved ones stay."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            ended.signal = signum
            scope.cancel()
            return


async def _drive(loop: LoopBase, display: LiveDisplay, kwargs: dict[str, Any]) -> _Ended:
    ended = _Ended()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, tg.cancel_scope, ended)
        tg.start_soon(display.refresh_forever)
        try:
            run = loop.run(**kwargs)
            display.attach(run)
            async with run as results:
                async for result in results:
                    display.result(result)
            ended.summary = results.summary
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            ended.error = exc
        tg.cancel_scope.cancel()
    return ended


class _DisplayLog(logging.Handler):
    """The engine's log lines, printed above the live display."""

    def __init__(self, display: LiveDisplay) -> None:
        super().__init__()
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.display.message(f"  {record.levelname.lower()}: {record.getMessage()}")
        except Exception:
            self.handleError(record)


def _error_line(exc: BaseException) -> str:
    notes = "; ".join(getattr(exc, "__notes__", ()))
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(f"{text} ({notes})".split()) if notes else " ".join(text.split())


def _execute(loop: LoopBase, budget: _Budget, *, debug: bool) -> int:
    """Run ``loop`` with a live display; report how it ended; return the exit status."""
    trace = loop.session_folder.parent
    steps = len(loop.steps)
    total = (
        budget.step_n
        if budget.step_n is not None
        else (budget.loop_n * steps if budget.loop_n else None)
    )
    interactive = sys.stderr.isatty() and not budget.no_progress
    display = LiveDisplay(
        loop, sys.stderr, interactive=interactive, total_steps=total, verbose=budget.verbose
    )
    engine_log = logging.getLogger("rdagent_loop")
    handler = _DisplayLog(display)
    handler.setLevel(logging.INFO if budget.verbose else logging.WARNING)
    engine_log.addHandler(handler)
    old_level = engine_log.level
    engine_log.setLevel(logging.INFO if budget.verbose else logging.WARNING)
    kwargs: dict[str, Any] = {"loop_n": budget.loop_n, "step_n": budget.step_n}
    if budget.timeout is not None:
        kwargs["all_duration"] = budget.timeout
    started = time.monotonic()
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.simplefilter("default")

            def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
                display.message(f"  warning: {message}")

            warnings.showwarning = show
            try:
                ended = anyio.run(_drive, loop, display, kwargs, backend=budget.backend)
            except KeyboardInterrupt:  # a Ctrl-C before the signal watcher started
                ended = _Ended(signal=signal.SIGINT)
    finally:
        display.close()
        engine_log.removeHandler(handler)
        engine_log.setLevel(old_level)
    seconds = time.monotonic() - started
    prog = _prog()
    resume = f"{prog} resume {_show(trace)}"
    saved = sum(1 for s in list_snapshots(loop.session_folder) if s.valid)
    if ended.signal is not None:
        how = (
            "Ctrl-C (SIGINT)"
            if ended.signal == signal.SIGINT
            else signal.Signals(ended.signal).name
        )
        click.echo(
            f"interrupted by {how} after {display.steps_done} steps: stopped cleanly; "
            f"the session in {_show(trace)} keeps every completed step ({saved} snapshots)."
        )
        click.echo(f"resume with: {resume}")
        return EXIT_SIGNAL.get(signal.Signals(ended.signal), 1)
    if ended.error is not None:
        if debug:
            traceback.print_exception(ended.error)
        click.echo(f"{prog}: error: {_error_line(ended.error)}", err=True)
        click.echo(
            f"the session in {_show(trace)} keeps every completed step; resume with: {resume}",
            err=True,
        )
        return 1
    summary = ended.summary
    assert summary is not None
    click.echo(f"finished: {summary} in {format_seconds(seconds)}")
    best = getattr(loop, "best", None)
    if best is not None and not callable(best):
        click.echo(f"best: {best}")
    click.echo(f"session: {_show(trace)} ({saved} snapshots)")
    unfinished = loop.get_unfinished_loop_cnt(loop.loop_idx)
    if unfinished or summary.reason in ("step_n", "all_duration"):
        click.echo(f"resume with: {resume}")
    else:
        click.echo(f"run more loops with: {resume} --loop-n 4")
    click.echo(
        f"inspect with: {prog} inspect {_show(trace)}; "
        f"chart: {prog} timeline {_show(trace)} -o timeline.svg"
    )
    return 0


def _has_session(trace: Path) -> bool:
    return bool(list_snapshots(trace / "__session__"))


def _start(
    factory: Callable[[LoopSettings], LoopBase],
    class_name: str,
    trace: Path | None,
    budget: _Budget,
    *,
    debug: bool,
) -> int:
    if trace is not None and _has_session(trace):
        raise CliError(
            f"{_show(trace)} already holds a session: continue it with "
            f"`{_prog()} resume {_show(trace)}`, or choose another --trace-path"
        )
    overrides: dict[str, Any] = {"progress": False}
    if trace is not None:
        overrides["trace_path"] = trace.absolute()
    if budget.parallel is not None:
        overrides["step_semaphore"] = budget.parallel
    try:
        settings = LoopSettings(**overrides)
        loop = factory(settings)
    except Exception as exc:
        raise CliError(f"cannot create {class_name}: {_error_line(exc)}") from None
    # a class that builds its own settings still gets what the command line asked for
    if any(getattr(loop.settings, k) != v for k, v in overrides.items()):
        loop.settings = loop.settings.model_copy(update=overrides)
        if trace is not None:
            loop.session_folder = trace.absolute() / "__session__"
    trace = loop.session_folder.parent
    if _has_session(trace):
        raise CliError(
            f"{_show(trace)} already holds a session: resume it or choose another --trace-path"
        )
    write_meta(
        trace,
        loop_class=class_name,
        created_at=datetime.now().astimezone().isoformat(),
        command=" ".join(shlex.quote(a) for a in sys.argv),
    )
    what = f"{budget.loop_n} loops" if budget.loop_n is not None else "loops until stopped"
    click.echo(
        f"running {class_name}: {what}, {loop.settings.max_parallel} in parallel, on "
        f"{budget.backend}; session in {_show(trace)}"
    )
    return _execute(loop, budget, debug=debug)


def _construct(cls: type[LoopBase]) -> Callable[[LoopSettings], LoopBase]:
    """Build ``cls`` with the settings: as its argument if it takes one, else from the env."""

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    takes_settings = "settings" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def factory(settings: LoopSettings) -> LoopBase:
        if takes_settings:
            return cls(settings=settings)
        env = {
            "RDAGENT_LOOP_PROGRESS": "false",
            "RDAGENT_LOOP_TRACE_PATH": str(settings.trace_path),
            "RDAGENT_LOOP_STEP_SEMAPHORE": json.dumps(settings.step_semaphore),
        }
        os.environ.update(env)
        return cls()

    return factory


def _resume(
    session: Path,
    checkout: Path | None,
    loop_class: str | None,
    budget: _Budget,
    *,
    debug: bool,
) -> int:
    paths = resolve(session)
    snapshots = list_snapshots(paths.session_folder)
    if not snapshots:
        raise CliError(
            f"no session at {_show(session)}: {_show(paths.session_folder)} holds no snapshots"
        )
    if paths.snapshot is not None:
        info = next((s for s in snapshots if s.path == paths.snapshot), None)
        if info is None or not info.valid:
            problem = info.problem if info is not None else "not a snapshot of this session"
            raise CliError(f"cannot resume from {_show(paths.snapshot)}: {problem}")
    else:
        newest = newest_valid(snapshots)
        if newest is None:
            raise CliError(
                f"no valid snapshot in {_show(paths.session_folder)}: every one is corrupt"
            )
        info = newest
    for later in snapshots[snapshots.index(info) + 1 :]:
        click.echo(
            f"  warning: skipping corrupt snapshot {_show(later.path)}: {later.problem}", err=True
        )
    if checkout is not None and _has_session(checkout):
        raise CliError(
            f"{_show(checkout)} already holds a session: choose an empty folder to fork into"
        )
    checkout_arg: bool | Path = checkout if checkout is not None else paths.snapshot is not None
    loop, found = load_loop(paths, info.path, loop_class, checkout=checkout_arg)
    for text in found:
        if "skipping" not in text:
            click.echo(f"  warning: {text}", err=True)
    trace = loop.session_folder.parent
    name = qualified_name(type(loop))
    meta = read_meta(paths.trace_path)
    if checkout is not None:
        write_meta(trace, **(meta | {"loop_class": name, "forked_from": str(info.path)}))
    elif not meta.get("loop_class"):
        write_meta(trace, loop_class=name)
    update: dict[str, Any] = {"progress": False}
    if budget.parallel is not None:
        update["step_semaphore"] = budget.parallel
    loop.settings = loop.settings.model_copy(update=update)
    # a budget the last run used up does not stop this one before it starts
    if loop.step_n == 0:
        loop.step_n = None
    if budget.timeout is not None:
        loop.timer.reset(budget.timeout)
    elif loop.timer.started and (loop.timer.remain_time() or timedelta(0)) <= timedelta(0):
        click.echo(
            "  note: its time budget was used up; it runs without one now (--timeout sets one)"
        )
        loop.timer = Timer()
    n = len(loop.steps)
    unfinished = [li for li in range(loop.loop_idx) if loop.step_idx.get(li, 0) < n]
    finished = loop.loop_idx - len(unfinished)
    written = datetime.fromtimestamp(info.written_at_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    where = info.path.relative_to(paths.session_folder)
    nexts = ", ".join(
        f"loop {li} at {loop.steps[loop.step_idx.get(li, 0)]}" for li in unfinished[:4]
    )
    nexts += ", …" if len(unfinished) > 4 else ""
    fork = f" into {_show(trace)} (the original stays as it is)" if checkout is not None else ""
    click.echo(
        f"resumed {name} from snapshot {where} (loop {info.loop_idx}, step {info.step_idx} "
        f"{info.step_name!r}, written {written}){fork}"
    )
    remain = loop.timer.remain_time()
    click.echo(
        f"  {finished} loops finished, {len(unfinished)} unfinished"
        + (f" ({nexts})" if unfinished else "")
        + (f"; time left {format_seconds(remain.total_seconds())}" if remain is not None else "")
    )
    if (
        not unfinished
        and budget.loop_n is None
        and not loop.loop_n
        and budget.step_n is None
        and loop.step_n is None
    ):
        click.echo(
            "  the session has run all its loops: pass --loop-n N to run N more, as in "
            f"`{_prog()} resume {_show(trace)} --loop-n 3`"
        )
        return 0
    return _execute(loop, budget, debug=debug)


# -- the commands ---------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="rdagent-loop")
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run, watch, stop, inspect and resume R&D loops (rdagent_loop)."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("target", metavar="MODULE:CLASS")
@_budget_options
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
        raise CliError(str(exc)) from None
    budget = _Budget(**options)
    return _start(_construct(cls), qualified_name(cls), trace_path, budget, debug=ctx.obj["debug"])


@cli.command()
@click.argument("session", type=click.Path(path_type=Path))
@click.option(
    "--checkout",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Fork: continue in PATH and leave SESSION untouched.",
)
@click.option(
    "--class",
    "loop_class",
    metavar="MODULE:CLASS",
    help="The loop class, for a session not started by this command.",
)
@_budget_options
@click.pass_context
def resume(
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
        return _resume(session, checkout, loop_class, _Budget(**options), debug=ctx.obj["debug"])
    except SessionError as exc:
        raise CliError(str(exc)) from None


def _cell(status: str, seconds: float | None, corrupt: bool) -> tuple[str, str | None]:
    text, colour = {
        "done": (f"ok {format_seconds(seconds or 0.0)}", "green"),
        "failed": (f"FAIL {format_seconds(seconds or 0.0)}", "red"),
        "skipped": ("skipped", "yellow"),
        "next": ("next", "cyan"),
        "pending": ("·", None),
    }[status]
    if corrupt:
        return text + " !corrupt", "magenta"
    return text, colour


def render_table(report: SessionReport, width: int) -> list[str]:
    """The loops x steps table of ``inspect``: plain text, styled when shown on a terminal."""
    lines: list[str] = []
    loops = report.loops
    finished = sum(1 for r in loops if r.status == "finished")
    header = (
        f"session {_show(report.session_folder)} · {report.loop_class or 'unknown class'} · "
        f"{len(loops)} loops ({finished} finished, {len(loops) - finished} not) · "
        f"{len(report.snapshots)} snapshots"
    )
    if report.corrupt:
        header += click.style(f" ({len(report.corrupt)} corrupt)", fg="magenta", bold=True)
    lines.append(header)
    if report.loaded_from:
        left = report.time_left
        extra = f"; time left {format_seconds(left.total_seconds())}" if left is not None else ""
        lines.append(f"state from snapshot {report.loaded_from}{extra}")
    if report.problem:
        lines.append(click.style(f"cannot load the state: {report.problem}", fg="red"))
    lines.append("")
    cells = [
        [_cell(s.status, s.duration, s.snapshot_problem is not None) for s in row.steps]
        for row in loops
    ]
    widths = [
        max([len(name)] + [len(c[i][0]) for c in cells if i < len(c)])
        for i, name in enumerate(report.steps)
    ]
    fixed = 6 + 12 + sum(w + 2 for w in widths) + 9
    result_w = max(12, width - fixed)
    head = (
        f"{'loop':>4}  {'status':<10}  "
        + "".join(f"{name:<{w}}  " for name, w in zip(report.steps, widths, strict=False))
        + f"{'time':>7}  result"
    )
    lines.append(click.style(head, bold=True))
    for row, row_cells in zip(loops, cells, strict=False):
        status_colour = {"finished": None, "unfinished": "cyan", "lost": "magenta"}[row.status]
        line = f"{row.loop_idx:>4}  " + click.style(f"{row.status:<10}", fg=status_colour) + "  "
        for (text, colour), w in zip(row_cells, widths, strict=False):
            line += click.style(f"{text:<{w}}", fg=colour) + "  "
        errors = row.errors
        result = f"{errors[-1].step_name}: {errors[-1].error}" if errors else row.result
        if len(result) > result_w:
            result = result[: result_w - 1] + "…"
        line += f"{format_seconds(row.busy):>7}  " + (
            click.style(result, fg="red") if errors else result
        )
        lines.append(line)
    if report.corrupt:
        lines.append("")
        lines.append(
            click.style("corrupt snapshots (skipped when loading):", fg="magenta", bold=True)
        )
        for s in report.corrupt:
            where = (
                s.path.relative_to(report.session_folder)
                if s.path.is_relative_to(report.session_folder)
                else s.path
            )
            lines.append(f"  {where}: {s.problem}")
    for text in report.warnings:
        lines.append(click.style(f"warning: {text}", fg="yellow"))
    return lines


@cli.command("inspect")
@click.argument("session", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for scripts.")
@click.option(
    "--class",
    "loop_class",
    metavar="MODULE:CLASS",
    help="The loop class, for a session not started by this command.",
)
def inspect_command(session: Path, as_json: bool, loop_class: str | None) -> int:
    """Show every loop x step of SESSION: status, duration, result, errors, corrupt snapshots."""
    try:
        report, _ = read_session(session, loop_class)
    except SessionError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        width = shutil.get_terminal_size((140, 24)).columns
        for line in render_table(report, width):
            click.echo(line)
    return 1 if report.problem else 0


def _svg_to_png(svg: str, output: Path) -> None:
    browser = next(
        (
            shutil.which(n)
            for n in ("chromium", "chromium-browser", "google-chrome")
            if shutil.which(n)
        ),
        None,
    )
    if browser is None:
        raise CliError(
            "a PNG needs Chromium to render the SVG (apt-get install chromium); "
            "write a .svg instead"
        )
    size = re.search(r'width="(\d+)" height="(\d+)"', svg)
    assert size is not None
    with tempfile.TemporaryDirectory(prefix="rdagent-timeline-") as tmp:
        page = Path(tmp) / "timeline.svg"
        page.write_text(svg)
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={Path(tmp) / 'profile'}",
            "--force-device-scale-factor=1",
            "--default-background-color=ffffffff",
            f"--window-size={size.group(1)},{size.group(2)}",
            f"--screenshot={output.absolute()}",
            page.as_uri(),
        ]
        try:
            subprocess.run(command, capture_output=True, timeout=120, check=True)
        except (subprocess.SubprocessError, OSError) as exc:
            raise CliError(f"Chromium could not render the PNG: {exc}") from None
    if not output.exists():
        raise CliError("Chromium did not write the PNG")


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
    "--class",
    "loop_class",
    metavar="MODULE:CLASS",
    help="The loop class, for a session not started by this command.",
)
def timeline(
    session: Path, output: Path, width: int, title: str | None, loop_class: str | None
) -> int:
    """Draw every step of every loop of SESSION over time: where the time went."""
    try:
        report, loop = read_session(session, loop_class)
    except SessionError as exc:
        raise CliError(str(exc)) from None
    if loop is None:
        raise CliError(f"cannot chart {_show(session)}: {report.problem}")
    svg = render_svg(report, width=width, title=title)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".png":
        _svg_to_png(svg, output)
    else:
        output.write_text(svg)
    steps = sum(1 for row in report.loops for s in row.steps if s.started_at)
    click.echo(f"wrote {_show(output)}: {len(report.loops)} loops, {steps} steps")
    return 0


def _examples_importable() -> None:
    """The examples live in the repository, beside the package: make them importable."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / "examples" / "data_science").is_dir():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return
    raise CliError(
        "the demo needs the repository's examples/ folder: run it from a checkout of rdagent_loop"
    )


@cli.command()
@_budget_options
@click.option(
    "--trace-path",
    type=click.Path(path_type=Path),
    default=Path(DEMO_TRACE_PATH),
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
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the data and the 'LLM'."
)
@click.option(
    "--llm-latency",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Seconds the stand-in LLM thinks before it proposes an experiment.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    /,
    trace_path: Path,
    resume_path: Path | None,
    overwrite: bool,
    seed: int,
    llm_latency: float,
    **options: Any,
) -> int:
    """Run the data-science example: parallel R&D loops training real models in child processes.

    10 loops, 3 in parallel, unless told otherwise; the session is saved and resumable.
    """
    _examples_importable()
    budget = _Budget(**options)
    debug = ctx.obj["debug"]
    if resume_path is not None:
        try:
            return _resume(resume_path, None, DEMO_CLASS, budget, debug=debug)
        except SessionError as exc:
            raise CliError(str(exc)) from None
    if budget.loop_n is None and budget.step_n is None and budget.timeout is None:
        budget.loop_n = 10
    if budget.parallel is None:
        budget.parallel = 3
    if _has_session(trace_path) or (trace_path / "workspace").exists():
        if not overwrite:
            raise CliError(
                f"{_show(trace_path)} already holds a session: continue it with "
                f"`{_prog()} resume {_show(trace_path)}`, or start over with --overwrite"
            )
        for name in ("__session__", "workspace", "data"):
            shutil.rmtree(trace_path / name, ignore_errors=True)
        for name in ("llm_calls.jsonl", "rdagent-loop.json"):
            (trace_path / name).unlink(missing_ok=True)
    cls = import_loop_class(DEMO_CLASS)

    def factory(settings: LoopSettings) -> LoopBase:
        return cls(settings, seed=seed, llm_latency=llm_latency)  # type: ignore[call-arg]

    return _start(factory, DEMO_CLASS, trace_path, budget, debug=debug)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``rdagent-loop`` command; return the exit status (``__main__`` exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = _prog()
    try:
        status = cli.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as exc:
        message = exc.format_message()
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message += f" (see `{exc.ctx.command_path} --help`)"
        click.echo(f"{prog}: error: {' '.join(message.split())}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        if "--debug" in args:
            traceback.print_exc()
        click.echo(f"{prog}: error: {_error_line(exc)}", err=True)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
