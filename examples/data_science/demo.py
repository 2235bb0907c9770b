"""What ``python -m rdagent_loop demo`` runs: this example, with its defaults and options.

The command line knows nothing of the example but this module's name; it asks it for the
loop class, where the session goes, how many loops, the command's own options
(:func:`options`, passed on to :func:`make_loop`), the files a run leaves beside its
session (:func:`left_by_a_run`, :func:`clear`), and, around a resume (:func:`watch_runs`),
the lines that say what the resume did not pay for again (:func:`resume_report`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from rdagent_loop import LoopRun, LoopSettings

from .loop import DataScienceLoop
from .loop import watch_runs as watch_runs

F = TypeVar("F", bound=Callable[..., Any])

HELP = """Run the data-science example: parallel R&D loops training real models in child processes.

10 loops, 3 in parallel, unless told otherwise; the session is saved and resumable.
"""

LOOP_CLASS = DataScienceLoop
TRACE_PATH = Path("demo-session")
LOOP_N = 10
PARALLEL = 3

_OUTPUTS = ("workspace", "data", "llm_calls.jsonl")  # what a run writes beside __session__


def options(command: F) -> F:
    """The demo's own options; their values are the keyword arguments of :func:`make_loop`."""
    command = click.option(
        "--llm-latency",
        type=click.FloatRange(min=0),
        default=0.25,
        show_default=True,
        help="Seconds the stand-in LLM thinks before each answer (a proposal takes two).",
    )(command)
    return click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="Seed of the data and the 'LLM': the same seed proposes the same experiments.",
    )(command)


def make_loop(settings: LoopSettings, *, seed: int, llm_latency: float) -> DataScienceLoop:
    return DataScienceLoop(settings, seed=seed, llm_latency=llm_latency)


def left_by_a_run(trace_path: Path) -> bool:
    """Whether a run started here, even one stopped before its first snapshot."""
    return (trace_path / "workspace").exists()


def clear(trace_path: Path) -> None:
    """Delete what a run wrote beside its session (the session itself is not ours)."""
    for name in _OUTPUTS:
        path = trace_path / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def resume_report(runs: list[LoopRun]) -> list[str]:
    """What the resumed run replayed from the journal instead of paying for it again: every
    call it memoizes is a model call (none if no run started)."""
    lines = []
    for run in runs:
        try:
            stats = run.statistics()
        except RuntimeError:  # refused before it started
            continue
        n, made = stats.memo_replayed, stats.memo_recorded
        lines.append(
            f"the resume replayed {_calls(n)} from the journal instead of paying for "
            f"{'it' if n == 1 else 'them'} again; {_calls(made, 'new ')} made"
        )
    return lines


def _calls(n: int, what: str = "") -> str:
    return f"{n} {what}model call" + ("" if n == 1 else "s")
