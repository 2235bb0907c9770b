"""Getting a loop ready to run from the command line: in a new session, or resumed.

Either way the loop gets the command line's settings (``--parallel``, ``--trace-path``, no
progress bar of its own: the live display replaces it), the session gets its meta file (so
``resume`` and ``inspect`` know the class), and the user gets a line on what will run. A
resumed session's cost budget that is spent already stops the resume before it starts:
``--cost`` caps the session's total, so only a larger one lets it go on.
"""

from __future__ import annotations

import inspect
import math
import shlex
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from .. import LoopBase, LoopSettings, SnapshotInfo, Timer, list_snapshots
from .._budget import carry_budgets
from .._inspect import (
    SessionPaths,
    load_loop,
    newest_snapshot,
    read_meta,
    session_paths,
    spending_of,
    write_meta,
)
from .._session import qualified_name
from .._timeline import format_cost, format_seconds, format_spent
from ._driver import RunOptions, more_budget, run_with_display
from ._messages import CliError, error_line, plural, prog, shown


def has_session(trace: Path) -> bool:
    return bool(list_snapshots(trace / "__session__"))


def construct(cls: type[LoopBase]) -> Callable[[LoopSettings], LoopBase]:
    """Build ``cls`` with the settings as its argument if it takes one, else without.

    A class that builds its own settings gets the command line's from :func:`start`.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "settings" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return lambda settings: cls(settings=settings)
    return lambda settings: cls()


def start(
    factory: Callable[[LoopSettings], LoopBase],
    class_name: str,
    trace: Path | None,
    options: RunOptions,
    *,
    debug: bool,
) -> int:
    """Run a new loop from ``factory`` in a new session; return the exit status."""
    if trace is not None and has_session(trace):
        raise CliError(
            f"{shown(trace)} already holds a session: continue it with "
            f"`{prog()} resume {shown(trace)}`, or choose another --trace-path"
        )
    overrides: dict[str, Any] = {"progress": False}
    if trace is not None:
        overrides["trace_path"] = trace.absolute()
    if options.parallel is not None:
        overrides["step_semaphore"] = options.parallel
    try:
        loop = factory(LoopSettings(**overrides))
    except Exception as exc:
        raise CliError(f"cannot create {class_name}: {error_line(exc)}") from exc
    # a class that builds its own settings still gets what the command line asked for
    if any(getattr(loop.settings, k) != v for k, v in overrides.items()):
        loop.settings = loop.settings.model_copy(update=overrides)
    if trace is not None and loop.session_folder != trace.absolute() / "__session__":
        loop._move_to(trace.absolute() / "__session__")  # the session and its archive
    trace = loop.session_folder.parent
    if has_session(trace):
        raise CliError(
            f"{shown(trace)} already holds a session: resume it or choose another --trace-path"
        )
    write_meta(
        trace,
        loop_class=class_name,
        created_at=datetime.now().astimezone().isoformat(),
        command=" ".join(shlex.quote(a) for a in sys.argv),
    )
    what = plural(options.loop_n, "loop") if options.loop_n is not None else "loops until stopped"
    budget = (
        f", a cost budget of {format_cost(options.cost)}"
        if options.cost is not None and not math.isinf(options.cost)
        else ""
    )
    click.echo(
        f"running {class_name}: {what}, {loop.settings.max_parallel} in parallel, on "
        f"{options.backend}{budget}; session in {shown(trace)}"
    )
    return run_with_display(loop, options, debug=debug)


def resume(
    session: Path,
    checkout: Path | None,
    loop_class: str | None,
    options: RunOptions,
    *,
    debug: bool,
) -> int:
    """Continue a saved session (or fork it into ``checkout``); return the exit status.

    Raises :class:`SessionError` when the session cannot be read.
    """
    paths = session_paths(session)
    info = _snapshot_to_resume(paths, session)
    if checkout is not None and has_session(checkout):
        raise CliError(
            f"{shown(checkout)} already holds a session: choose an empty folder to fork into"
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
    if options.parallel is not None:
        update["step_semaphore"] = options.parallel
    loop.settings = loop.settings.model_copy(update=update)
    if options.timeout is not None:
        loop.timer.reset(options.timeout)
    elif loop.timer.started and (loop.timer.remain_time() or timedelta(0)) <= timedelta(0):
        click.echo(
            "  note: its time budget was used up; it runs without one now (--timeout sets one)"
        )
        loop.timer = Timer()
    n = len(loop.steps)
    unfinished = [li for li in range(loop.loop_idx) if loop.step_idx.get(li, 0) < n]
    click.echo(_resumed_line(loop, name, info, paths.session_folder, checkout is not None))
    remain = loop.timer.remain_time()
    nexts = ", ".join(
        f"loop {li} at {loop.steps[loop.step_idx.get(li, 0)]}" for li in unfinished[:4]
    )
    nexts += ", …" if len(unfinished) > 4 else ""
    spending = spending_of(loop)
    limit = options.cost if options.cost is not None or spending is None else spending.limit
    spent = ""
    if spending is not None and (spending.cost or spending.tokens or limit is not None):
        spent = f"; spent {format_spent(spending.cost, spending.tokens, limit)}"
    click.echo(
        f"  {plural(loop.loop_idx - len(unfinished), 'loop')} finished, "
        f"{len(unfinished)} unfinished"
        + (f" ({nexts})" if unfinished else "")
        + (f"; time left {format_seconds(remain.total_seconds())}" if remain is not None else "")
        + spent
    )
    if spending is not None and limit is not None and spending.cost >= limit:
        # the run would stop before its first step: say why, and what would let it go on
        more = more_budget(limit, spending.cost) or "AMOUNT"
        again = f"{prog()} resume {shown(trace)} --cost {more}"
        if options.cost is not None:
            raise CliError(
                f"--cost {options.cost:g} is not more than the {format_cost(spending.cost)} "
                "the session has spent: --cost caps the session's total, what it spent so "
                f"far included; pass more, as in `{again}`"
            )
        click.echo(
            f"  the session's cost budget of {format_cost(limit)} is spent "
            f"({format_cost(spending.cost)}): pass a larger one to go on, as in `{again}`"
        )
        return 0
    # the budgets the engine will run with: the saved ones, or the command line's
    step_n, loop_n = carry_budgets(loop, step_n=options.step_n, loop_n=options.loop_n)
    if not unfinished and step_n is None and not loop_n:
        click.echo(
            "  the session has run all its loops: pass --loop-n N to run N more, as in "
            f"`{prog()} resume {shown(trace)} --loop-n 3`"
        )
        return 0
    return run_with_display(loop, options, debug=debug)


def _snapshot_to_resume(paths: SessionPaths, session: Path) -> SnapshotInfo:
    """The snapshot file named, or the one a load of the folder picks (newer ones reported)."""
    snapshots = list_snapshots(paths.session_folder)
    if not snapshots:
        raise CliError(
            f"no session at {shown(session)}: {shown(paths.session_folder)} holds no snapshots"
        )
    if paths.snapshot is not None:
        info = next((s for s in snapshots if s.path == paths.snapshot), None)
        if info is None or not info.valid:
            problem = info.problem if info is not None else "not a snapshot of this session"
            raise CliError(f"cannot resume from {shown(paths.snapshot)}: {problem}")
        return info
    newest, snapshots = newest_snapshot(paths, snapshots)
    if newest is None:
        raise CliError(f"no valid snapshot in {shown(paths.session_folder)}: every one is corrupt")
    for later in snapshots[snapshots.index(newest) + 1 :]:
        click.echo(
            f"  warning: skipping corrupt snapshot {shown(later.path)}: {later.problem}", err=True
        )
    return newest


def _resumed_line(loop: LoopBase, name: str, info: SnapshotInfo, folder: Path, forked: bool) -> str:
    """Which snapshot the run continues from, and where it goes on."""
    written = datetime.fromtimestamp(info.written_at_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
    fork = f" into {shown(loop.session_folder.parent)} (the original stays as it is)"
    return (
        f"resumed {name} from snapshot {info.path.relative_to(folder)} (loop {info.loop_idx}, "
        f"step {info.step_idx} {info.step_name!r}, written {written}){fork if forked else ''}"
    )
