"""What ``inspect`` and ``timeline`` draw: the loops x steps table (with the steps in
progress: what they memoized, what they ask; and what each loop's steps charged, with the
session's spending against its budget), and the chart as a PNG.

The SVG itself comes from :mod:`rdagent_loop._timeline`; a PNG is that SVG rendered by a
headless Chromium, so no imaging library is needed.
"""

from __future__ import annotations

import re
import reprlib
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from .._inspect import JournalRow, SessionReport, summarize
from .._results import Question
from .._timeline import format_cost, format_seconds, format_spent
from ._messages import CliError, plural, prog, shown

_payload_repr = reprlib.Repr()
_payload_repr.maxstring = 50
_payload_repr.maxother = 50


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


def _journal_cell(journal: JournalRow, text: str, colour: str | None) -> tuple[str, str | None]:
    """The cell of a step in progress that journaled something: it asks, it memoized."""
    memos = f"{journal.memos} memo" if journal.memos else ""
    if journal.questions:
        return " ".join(filter(None, ("asks?", memos))), "yellow"
    return " ".join(filter(None, (text, memos))), colour


def journal_totals(report: SessionReport) -> str:
    """``2 open questions · 5 memoized calls journaled``, or "" when the journal is empty."""
    parts = []
    if report.questions:
        parts.append(plural(len(report.questions), "open question"))
    if report.answers_waiting:
        parts.append(f"{plural(report.answers_waiting, 'answer')} left for the run to take")
    if report.memos_journaled:
        parts.append(f"{plural(report.memos_journaled, 'memoized call')} journaled")
    return " · ".join(parts)


def asked_when(asked_at: datetime | None) -> str:
    """``2025-01-01 12:00:01 (3m 05s ago)`` in local time."""
    if asked_at is None:
        return "?"
    ago = format_seconds(max(0.0, (datetime.now(timezone.utc) - asked_at).total_seconds()))
    return f"{asked_at.astimezone().strftime('%Y-%m-%d %H:%M:%S')} ({ago} ago)"


def render_questions(questions: list[Question], trace: Path) -> list[str]:
    """What ``questions`` prints: one line per open question, then how to answer."""
    where = shown(trace)
    if not questions:
        return [f"no open questions in {where}: no step waits for an answer"]
    lines = [f"{plural(len(questions), 'open question')} in {where}:"]
    for q in questions:
        about = f" about {short_payload(q.payload)}" if q.payload is not None else ""
        lines.append(
            f"  {q.id}  loop {q.loop_idx} step {q.step_idx} {q.step_name}  "
            f"asked {asked_when(q.asked_at)}: {click.style(repr(q.question), bold=True)}{about}"
        )
    lines.append(
        f"answer with: {prog()} answer {where} {questions[0].id} 'JSON' "
        """(a JSON value: '"yes"', 3, '{"edit": "..."}', null)"""
    )
    return lines


def short_payload(payload: Any) -> str:
    """A question's payload as a short one-line repr."""
    return summarize(_payload_repr.repr(payload), 60)


def render_table(report: SessionReport, width: int) -> list[str]:
    """The loops x steps table of ``inspect``: plain text, styled when shown on a terminal.
    A ``cost`` column (each loop's completed steps) only when some step charged."""
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
    totals = journal_totals(report)
    if totals:
        header += " · " + totals
    costly = any(row.cost or row.tokens for row in loops)
    if costly:
        header += f" · cost {format_cost(report.cost)} ({report.tokens:,} tokens)"
    lines.append(header)
    if report.loaded_from:
        left = report.time_left
        extra = f"; time left {format_seconds(left.total_seconds())}" if left is not None else ""
        spending = report.spending
        if spending is not None and (spending.cost or spending.tokens or spending.left is not None):
            # every charge of every run: failed, cancelled and withdrawn steps' too
            extra += "; the session spent " + format_spent(
                spending.cost, spending.tokens, spending.limit
            )
        lines.append(f"state from snapshot {report.loaded_from}{extra}")
    if report.problem:
        lines.append(click.style(f"cannot load the state: {report.problem}", fg="red"))
    lines.append("")
    cells = [
        [_cell(s.status, s.duration, s.snapshot_problem is not None) for s in row.steps]
        for row in loops
    ]
    for row, row_cells in zip(loops, cells, strict=True):
        j = row.journal
        if j is not None and j.step_idx < len(row_cells):
            row_cells[j.step_idx] = _journal_cell(j, *row_cells[j.step_idx])
    widths = [
        max([len(name)] + [len(c[i][0]) for c in cells if i < len(c)])
        for i, name in enumerate(report.steps)
    ]
    costs = [format_cost(row.cost) for row in loops] if costly else []
    cost_w = max([4, *map(len, costs)]) if costly else 0
    fixed = 6 + 12 + sum(w + 2 for w in widths) + 9 + (cost_w + 2 if costly else 0)
    result_w = max(12, width - fixed)
    head = (
        f"{'loop':>4}  {'status':<10}  "
        + "".join(f"{name:<{w}}  " for name, w in zip(report.steps, widths, strict=False))
        + f"{'time':>7}  "
        + (f"{'cost':>{cost_w}}  " if costly else "")
        + "result"
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
        line += f"{format_seconds(row.busy):>7}  "
        if costly:
            line += f"{format_cost(row.cost):>{cost_w}}  "
        line += click.style(result, fg="red") if errors else result
        lines.append(line)
    questions = report.questions
    if questions:
        lines.append("")
        lines.append(
            click.style(f"open questions ({len(questions)}):", fg="yellow", bold=True)
            + f" answer with: {prog()} answer {shown(report.trace_path)} ID 'JSON'"
        )
        for q in questions:
            about = f" about {q.payload}" if q.payload else ""
            lines.append(
                f"  loop {q.loop_idx} {q.step_name or f'step {q.step_idx}'}: {q.id} asks "
                f"{q.question!r}{about}, asked {asked_when(q.asked_at)}"
            )
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
