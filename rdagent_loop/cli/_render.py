"""What ``inspect`` and ``timeline`` draw: the loops x steps table, and the chart as a PNG.

The SVG itself comes from :mod:`rdagent_loop._timeline`; a PNG is that SVG rendered by a
headless Chromium, so no imaging library is needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import click

from .._inspect import SessionReport
from .._timeline import format_seconds
from ._messages import CliError, plural, shown


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
        f"session {shown(report.session_folder)} · {report.loop_class or 'unknown class'} · "
        f"{plural(len(loops), 'loop')} ({finished} finished, {len(loops) - finished} not) · "
        f"{plural(len(report.snapshots), 'snapshot')}"
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


def write_png(svg: str, output: Path) -> None:
    """Render ``svg`` to ``output`` with headless Chromium (no image library needed)."""
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
            raise CliError(f"Chromium could not render the PNG: {exc}") from exc
    if not output.exists():
        raise CliError("Chromium did not write the PNG")
