"""The timeline SVG: readable for hundreds of loops, failures marked, idle gaps cut out."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rdagent_loop._inspect import LoopRow, SessionReport, StepRow
from rdagent_loop._timeline import format_seconds, render_svg

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
