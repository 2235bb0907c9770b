"""The timeline SVG: readable for hundreds of loops, failures marked, idle gaps cut out, the
time steps waited for answers in a colour of its own."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rdagent_loop._inspect import LoopRow, SessionReport, StepRow
from rdagent_loop._timeline import FAIL, PALETTE, WAIT, format_seconds, render_svg

STEPS = ("propose", "coding", "running", "feedback", "record")
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
SVG = "{http://www.w3.org/2000/svg}"


def report(loops: list[list[tuple[float, float, str | None]]]) -> SessionReport:
    """``loops[i]`` lists (start, end, error) per step, in seconds after T0."""
    rows = []
    for li, steps in enumerate(loops):
        cells = tuple(
            StepRow(si, STEPS[si], "failed" if err else "done",
                    T0 + timedelta(seconds=a), T0 + timedelta(seconds=b), "out", err)
            for si, (a, b, err) in enumerate(steps)
        )  # fmt: skip
        rows.append(LoopRow(li, "finished", None, cells))
    return SessionReport(
        Path("/s"), Path("/s/__session__"), "m:Loop", STEPS, tuple(rows), (), "x/4_record"
    )


def sequential(
    n_loops: int, start: float = 0.0, step: float = 1.0
) -> list[list[tuple[float, float, str | None]]]:
    loops = []
    t = start
    for _ in range(n_loops):
        loops.append([(t + i * step, t + (i + 1) * step, None) for i in range(5)])
        t += 5 * step
    return loops


def bars(svg: str) -> list[ET.Element]:
    root = ET.fromstring(svg)
    return [g for g in root.iter(f"{SVG}g") if g.find(f"{SVG}title") is not None]


def test_one_bar_per_step_and_a_legend_of_where_the_time_went() -> None:
    loops = sequential(3)
    loops[1][2] = (loops[1][2][0], loops[1][2][1], "RunnerError: boom")
    svg = render_svg(report(loops))
    found = bars(svg)
    assert len(found) == 15
    titles = [g.find(f"{SVG}title").text or "" for g in found]  # type: ignore[union-attr]
    assert "loop 1 · running · 1.0s\nfailed: RunnerError: boom" in titles
    failed = [g for g in found if "failed" in (g.find(f"{SVG}title").text or "")]  # type: ignore[union-attr]
    assert len(failed) == 1 and "url(#fail-hatch)" in ET.tostring(failed[0]).decode()
    assert "failed: 1" in svg
    for name in STEPS:
        assert f'>{name}</tspan> <tspan fill="#555">20% · 3.0s</tspan>' in svg


def test_hundreds_of_loops_stay_on_one_readable_page() -> None:
    svg = render_svg(report(sequential(500, step=0.2)), width=1400)
    height = int(re.search(r'height="(\d+)"', svg).group(1))  # type: ignore[union-attr]
    assert 1500 < height < 2000  # rows of 3 px
    assert len(bars(svg)) == 2500
    labels = re.findall(r">loop (\d+)<", svg)
    assert labels[:3] == ["0", "5", "10"]  # thin rows: a label every few loops


def test_a_long_idle_gap_is_cut_out_of_the_axis() -> None:
    # 10 s of work, a night of nothing (a stopped run, resumed the next day), 10 s of work
    loops = sequential(2) + sequential(2, start=10 + 8 * 3600)
    svg = render_svg(report(loops), width=1000)
    assert "idle 8h 00m" in svg
    xs = [float(r.get("x", 0)) + float(r.get("width", 0))
          for g in bars(svg) for r in g.iter(f"{SVG}rect")]  # fmt: skip
    assert max(xs) <= 1000  # the work after the gap is still on the page, not squeezed off
    assert format_seconds(8 * 3600 + 30) == "8h 00m"


def test_the_time_a_step_waited_for_answers_has_its_own_colour() -> None:
    """Loop 1's coding step (2 s) waited 1.5 s for an answer (``loop.ask``)."""
    base = report(sequential(2, step=2.0))
    rows = list(base.loops)
    cells = list(rows[1].steps)
    coding = cells[1]
    assert coding.started_at is not None
    wait = (
        coding.started_at + timedelta(seconds=0.25),
        coding.started_at + timedelta(seconds=1.75),
    )
    cells[1] = replace(coding, waits=(wait,))
    rows[1] = replace(rows[1], steps=tuple(cells))
    svg = render_svg(replace(base, loops=tuple(rows)), width=1200)

    waits = [r for r in ET.fromstring(svg).iter(f"{SVG}rect") if r.get("class") == "wait"]
    assert len(waits) == 1 and waits[0].get("fill") == WAIT
    assert WAIT not in PALETTE and WAIT != FAIL
    # drawn over its step's bar, 3/4 of its width
    [bar] = [g for g in bars(svg) if "loop 1 · coding" in ET.tostring(g, encoding="unicode")]
    step_rect, wait_rect = bar.findall(f"{SVG}rect")
    assert wait_rect.get("class") == "wait"
    assert float(wait_rect.get("x", 0)) > float(step_rect.get("x", 0))
    assert float(wait_rect.get("width", 0)) == pytest.approx(
        0.75 * float(step_rect.get("width", 0)), rel=0.01
    )
    title = bar.find(f"{SVG}title")
    assert title is not None and "loop 1 · coding · 2.0s (1.5s waiting for an answer)" in (
        title.text or ""
    )
    # named in the legend; the shares of steps and waiting add up to the whole
    assert '>waiting for an answer</tspan> <tspan fill="#555">8% · 1.5s</tspan>' in svg
    assert '>coding</tspan> <tspan fill="#555">12% · 2.5s</tspan>' in svg
    assert "1.5s of it waiting for answers" in svg
    # a session without waits: no such colour, no such legend
    plain = render_svg(base)
    assert 'class="wait"' not in plain and "waiting for an answer" not in plain
