"""``python -m benchmarks [NAME ...]``: every benchmark in one table (docs/benchmarks.md).

Each ``benchmarks/bench_<name>.py`` has ``run() -> list[tuple[str, str, str]]`` (what, figure,
bar). Names: engine, snapshots, executors, sessions, journal, otel (default: all that are
present).
A benchmark that is missing is noted; one that fails is reported in the table and makes the
exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback

from benchmarks.bench_engine import Row, format_table

NAMES = ("engine", "snapshots", "executors", "sessions", "journal", "otel")


def _collect(name: str) -> tuple[list[Row], bool]:
    """Rows of one benchmark, and whether it ran without failing."""
    module_name = f"benchmarks.bench_{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return [(f"{name}: not present", f"({module_name} does not exist yet)", "-")], True
    started = time.perf_counter()
    try:
        rows: list[Row] = list(module.run())
    except Exception as exc:
        traceback.print_exc()
        return [(f"{name}: FAILED", f"{type(exc).__name__}: {exc}", "-")], False
    print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return rows, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES)}")
    rows: list[Row] = []
    ok = True
    for name in args.names or NAMES:
        collected, fine = _collect(name)
        rows += collected
        ok = ok and fine
    print(
        f"rdagent_loop benchmarks: Python {platform.python_version()} on {platform.machine()}, "
        f"{_cores()} cores; medians of up to 3 repeats; compare ratios, not absolute figures"
    )
    print(format_table(rows))
    return 0 if ok else 1


def _cores() -> str:
    return str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


if __name__ == "__main__":
    sys.exit(main())
