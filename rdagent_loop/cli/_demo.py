"""``rdagent-loop demo``: find the example it runs, and start or resume it.

The example lives in the repository beside the package, not in it; its
``examples/data_science/demo.py`` says what the demo runs, with which defaults and options.
After a resume, the last lines say how many model calls the run replayed from the session's
journal instead of paying for them again.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from .. import LoopBase, LoopSettings
from .._inspect import META_FILE
from .._session import qualified_name
from ._driver import RunOptions
from ._messages import CliError, prog, shown
from ._start import has_session, resume, start

DEMO_MODULE = "examples.data_science.demo"


def import_demo() -> ModuleType:
    """The example's demo module, from the current folder or the checkout we were run from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "examples" / "data_science").is_dir():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module(DEMO_MODULE)
    raise CliError(
        "the demo needs the repository's examples/ folder: run it from a checkout of rdagent_loop"
    )


def run_demo(
    demo: ModuleType,
    trace_path: Path,
    resume_path: Path | None,
    overwrite: bool,
    options: RunOptions,
    loop_options: dict[str, Any],
    *,
    debug: bool,
) -> int:
    """Start the demo in ``trace_path`` (or resume it from ``resume_path``); the exit status."""
    loop_class = qualified_name(demo.LOOP_CLASS)
    if resume_path is not None:
        with demo.watch_runs() as runs:
            status = resume(resume_path, None, loop_class, options, debug=debug)
        for line in demo.resume_report(runs):
            click.echo(line)
        return status
    if options.loop_n is None and options.step_n is None and options.timeout is None:
        options = replace(options, loop_n=demo.LOOP_N)
    if options.parallel is None:
        options = replace(options, parallel=demo.PARALLEL)
    if has_session(trace_path) or demo.left_by_a_run(trace_path):
        if not overwrite:
            raise CliError(
                f"{shown(trace_path)} already holds a session: continue it with "
                f"`{prog()} resume {shown(trace_path)}`, or start over with --overwrite"
            )
        shutil.rmtree(trace_path / "__session__", ignore_errors=True)
        (trace_path / META_FILE).unlink(missing_ok=True)
        demo.clear(trace_path)

    def factory(settings: LoopSettings) -> LoopBase:
        loop: LoopBase = demo.make_loop(settings, **loop_options)
        return loop

    return start(factory, loop_class, trace_path, options, debug=debug)
