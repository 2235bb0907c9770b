"""A Gantt chart of a session as a self-contained SVG: where the time went, at a glance.

One row per loop, one bar per finished step, coloured by step (or, with ``color_by="cost"``,
by what it charged: pale for the cheapest step, dark for the dearest); failed steps (skip
errors) are hatched and outlined in red, and the time a step waited for answers to its
questions (``loop.ask``) is drawn in a colour of its own. The header says how the time split
between the steps, and waiting (or, by cost, the range of the scale and the total).
Long idle stretches (a run stopped and resumed the next day) are cut out of the time axis
and marked, so the work stays readable. Rows shrink to a few pixels for hundreds of loops;
hovering a bar shows its loop, step, duration and error. Written by hand: no plotting
library needed, and nothing outside the file is referenced.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Literal

from ._inspect import SessionReport

# Paul Tol's "bright" scheme (colour-blind safe) without its red, which marks failures
PALETTE = ("#4477AA", "#66CCEE", "#228833", "#CCBB44", "#AA3377", "#BBBBBB", "#225588", "#997700")
FAIL = "#D62728"
WAIT = "#EE7733"  # Paul Tol's "vibrant" orange: no step's colour
WAITING = "waiting for an answer"
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
# viridis (sequential, colour-blind safe, no red or orange): the cheapest step is the palest
COST_SCALE = ("#FDE725", "#5EC962", "#21918C", "#3B528B", "#440154")
FREE = "#DDDDDD"  # a step that charged nothing: off the scale, so the scale spans the rest
ColorBy = Literal["step", "cost"]


@dataclass(frozen=True, slots=True)
class Bar:
    loop_idx: int
    step_idx: int
    step_name: str
    start: float  # seconds since the first step started
    end: float
    error: str | None
    output: str
    waits: tuple[tuple[float, float], ...] = ()  # waiting for answers, within start..end
    cost: float = 0.0  # what the step charged (``loop.charge``)
    tokens: int = 0

    @property
    def waited(self) -> float:
        return sum(e - s for s, e in self.waits)


def format_seconds(seconds: float) -> str:
    """``0.42s``, ``12s``, ``3m 05s``, ``2h 10m``: short, and exact enough to compare."""
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d {int(seconds % 86400 // 3600):02d}h"


def format_cost(amount: float) -> str:
    """``0``, ``0.0042``, ``0.315``, ``12.35``, ``1,234``: an amount in the unit the steps
    charge in, with the digits that tell amounts apart and none of a float's noise."""
    if amount == 0:
        return "0"
    if amount >= 1000:
        return f"{amount:,.0f}"
    if amount >= 1:
        return f"{amount:.2f}".rstrip("0").rstrip(".")
    return f"{amount:.3g}"


def format_spent(cost: float, tokens: int, limit: float | None = None) -> str:
    """``1.23 (4,560 tokens) of a budget of 5, 3.77 left``; without a (finite) budget,
    ``1.23 (4,560 tokens)``."""
    text = f"{format_cost(cost)} ({tokens:,} tokens)"
    if limit is not None and not math.isinf(limit):
        text += f" of a budget of {format_cost(limit)}, {format_cost(max(0.0, limit - cost))} left"
    return text


def cost_colour(fraction: float) -> str:
    """The colour of :data:`COST_SCALE` at ``fraction`` (0: the cheapest, 1: the dearest)."""
    fraction = min(1.0, max(0.0, fraction))
    position = fraction * (len(COST_SCALE) - 1)
    i = min(int(position), len(COST_SCALE) - 2)
    a, b = COST_SCALE[i], COST_SCALE[i + 1]
    t = position - i
    channels = (
        round(int(a[k : k + 2], 16) + (int(b[k : k + 2], 16) - int(a[k : k + 2], 16)) * t)
        for k in (1, 3, 5)
    )
    return "#" + "".join(f"{c:02X}" for c in channels)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def bars_of(report: SessionReport) -> tuple[list[Bar], datetime | None]:
    starts = [s.started_at for row in report.loops for s in row.steps if s.started_at]
    if not starts:
        return [], None
    t0 = min(starts)
    bars = []
    for row in report.loops:
        for s in row.steps:
            if s.started_at is None or s.ended_at is None:
                continue
            bars.append(
                Bar(
                    row.loop_idx,
                    s.step_idx,
                    s.step_name,
                    (s.started_at - t0).total_seconds(),
                    (s.ended_at - t0).total_seconds(),
                    s.error,
                    s.output,
                    _waits(s.waits, t0, s.started_at, s.ended_at),
                    s.cost,
                    s.tokens,
                )
            )
    return bars, t0


def _waits(
    waits: tuple[tuple[datetime, datetime], ...], t0: datetime, start: datetime, end: datetime
) -> tuple[tuple[float, float], ...]:
    """A step's waits in seconds since ``t0``, clipped to the step (clocks may disagree)."""
    found = []
    for a, b in waits:
        a, b = max(a, start), min(b, end)
        if b > a:
            found.append(((a - t0).total_seconds(), (b - t0).total_seconds()))
    return tuple(found)


class _Axis:
    """Maps seconds to x, with long idle gaps cut down to a fixed width."""

    GAP_PX = 26.0

    def __init__(self, bars: list[Bar], x0: float, x1: float) -> None:
        blocks: list[list[float]] = []
        for b in sorted(bars, key=lambda b: b.start):
            if blocks and b.start <= blocks[-1][1]:
                blocks[-1][1] = max(blocks[-1][1], b.end)
            else:
                blocks.append([b.start, b.end])
        span = (blocks[-1][1] - blocks[0][0]) if blocks else 1.0
        active = sum(e - s for s, e in blocks)
        threshold = max(2.0, 0.25 * active)
        self.gaps = [
            (blocks[i][1], blocks[i + 1][0])
            for i in range(len(blocks) - 1)
            if blocks[i + 1][0] - blocks[i][1] > threshold
        ]
        shown = max(span - sum(e - s for s, e in self.gaps), 1e-6)
        self.scale = max((x1 - x0) - self.GAP_PX * len(self.gaps), 50.0) / shown
        self.x0 = x0
        self.t_end = blocks[-1][1] if blocks else 1.0

    def x(self, t: float) -> float:
        x = self.x0
        last = 0.0
        for start, end in self.gaps:
            if t <= start:
                break
            if t < end:  # inside a gap: squeeze proportionally
                return x + (start - last) * self.scale + self.GAP_PX * (t - start) / (end - start)
            x += (start - last) * self.scale + self.GAP_PX
            last = end
        return x + (t - last) * self.scale

    def in_gap(self, t: float) -> bool:
        return any(start < t < end for start, end in self.gaps)

    @property
    def shown_seconds(self) -> float:
        return self.t_end - sum(e - s for s, e in self.gaps)


def _cost_gradient() -> str:
    """The legend's swatch of the cost scale, left (cheapest) to right (dearest)."""
    last = len(COST_SCALE) - 1
    stops = "".join(
        f'<stop offset="{i / last:.2f}" stop-color="{c}"/>' for i, c in enumerate(COST_SCALE)
    )
    return f'<linearGradient id="cost-scale" x1="0" y1="0" x2="1" y2="0">{stops}</linearGradient>'


def _nice_step(seconds: float, ticks: int) -> float:
    raw = max(seconds / max(ticks, 1), 1e-3)
    for unit in (0.001, 0.01, 0.1, 1, 10, 60, 600, 3600, 36000, 86400):
        for mult in (1, 2, 5):
            if unit * mult >= raw and not (unit == 10 and mult == 5):
                return unit * mult
    return raw


def _tick_label(seconds: float, step: float) -> str:
    if step < 1:
        return f"{seconds:.{max(0, -math.floor(math.log10(step)))}f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        m, s = divmod(round(seconds), 60)
        return f"{m}m" if s == 0 else f"{m}m{s:02d}s"
    h, rest = divmod(round(seconds), 3600)
    return f"{h}h" if rest == 0 else f"{h}h{rest // 60:02d}m"


def render_svg(
    report: SessionReport,
    *,
    width: int = 1200,
    title: str | None = None,
    color_by: ColorBy = "step",
) -> str:
    """The timeline of ``report`` as an SVG document; ``color_by="cost"`` colours each step
    by what it charged, on a scale from the cheapest step to the dearest."""
    if color_by not in ("step", "cost"):
        raise ValueError(f"color_by must be 'step' or 'cost', got {color_by!r}")
    bars, t0 = bars_of(report)
    steps = list(report.steps) or sorted({b.step_name for b in bars})
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(steps)}
    by_cost = color_by == "cost"
    charged = [b.cost for b in bars if b.cost > 0]
    cheapest, dearest = min(charged, default=0.0), max(charged, default=0.0)

    def fill_of(b: Bar) -> str:
        if not by_cost:
            return colour.get(b.step_name, "#888")
        if b.cost <= 0:
            return FREE
        if dearest <= cheapest:  # one price for every step that charged: one colour
            return COST_SCALE[-1]
        return cost_colour((b.cost - cheapest) / (dearest - cheapest))

    loops = [row.loop_idx for row in report.loops if any(s.started_at for s in row.steps)]
    unfinished = {row.loop_idx for row in report.loops if row.status != "finished"}
    row_of = {li: i for i, li in enumerate(loops)}
    n_rows = max(len(loops), 1)

    # vertical layout: rows shrink with the number of loops, down to 3 px
    row_h = max(3.0, min(22.0, 720.0 / n_rows))
    left, right = 78.0, 24.0
    plot_w = width - left - right

    # the header: title, totals, and a legend that says where the time went
    per_step: dict[str, float] = defaultdict(float)
    for b in bars:
        per_step[b.step_name] += b.end - b.start - b.waited
    waited = sum(b.waited for b in bars)
    busy = (sum(per_step.values()) + waited) or 1.0
    failed = sum(1 for b in bars if b.error)
    wall = max((b.end for b in bars), default=0.0)
    # (fill, name, what it stands for, width of the swatch)
    legend: list[tuple[str, str, str, float]]
    if by_cost:
        if not charged:
            scale = "no step charged anything"
        elif dearest > cheapest:
            scale = f"{format_cost(cheapest)} (cheapest) → {format_cost(dearest)} (dearest)"
        else:
            scale = f"{format_cost(dearest)} for every step that charged"
        legend = [("url(#cost-scale)", "cost per step", scale, 120.0)]
        free = sum(1 for b in bars if b.cost <= 0)
        if free and charged:
            legend.append((FREE, "no charge", _plural(free, "step"), 18.0))
    else:
        legend = [
            (
                colour[name],
                name,
                f"{per_step[name] / busy:.0%} · {format_seconds(per_step[name])}",
                18.0,
            )
            for name in steps
        ]
    if waited:
        legend.append((WAIT, WAITING, f"{waited / busy:.0%} · {format_seconds(waited)}", 18.0))
    legend_rows: list[list[tuple[float, tuple[str, str, str, float]]]] = [[]]
    x = left
    for item in legend:
        w = item[3] + 8 + 7.2 * (len(item[1]) + len(item[2]) + 1) + 18
        if x + w > width - right and legend_rows[-1]:
            legend_rows.append([])
            x = left
        legend_rows[-1].append((x, item))
        x += w
    top = 62.0 + 20.0 * len(legend_rows) + 14.0
    height = int(top + n_rows * row_h + 46)

    axis = _Axis(bars, left, left + plot_w)
    out: list[str] = []
    add = out.append
    add(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{FONT}" font-size="12">'
    )
    add(
        "<defs>"
        '<pattern id="fail-hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)">'
        f'<rect width="6" height="6" fill="{FAIL}" fill-opacity="0.25"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{FAIL}" stroke-width="3"/></pattern>'
        + (_cost_gradient() if by_cost else "")
        + "</defs>"
    )
    add(f'<rect width="{width}" height="{height}" fill="#ffffff"/>')
    name = title or f"{report.loop_class or 'session'} — {report.trace_path.name}"
    add(
        f'<text x="{left}" y="24" font-size="16" font-weight="bold" fill="#222">'
        f"{escape(name)}</text>"
    )
    started = t0.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t0 else "never"
    stats = (
        f"{_plural(len(loops), 'loop')} · {_plural(len(bars), 'step')} · "
        f"{format_seconds(wall)} from first to last step"
        f" (started {started}) · {format_seconds(busy)} of step time"
    )
    if waited:
        stats += f" · {format_seconds(waited)} of it waiting for answers"
    if by_cost:
        tokens = sum(b.tokens for b in bars)
        stats += f" · cost {format_cost(sum(b.cost for b in bars))} ({tokens:,} tokens)"
    if axis.gaps:
        stats += f" · {len(axis.gaps)} idle gap{'s' if len(axis.gaps) > 1 else ''} cut out"
    add(f'<text x="{left}" y="44" fill="#444">{escape(stats)}</text>')
    ly = 64.0
    for legend_row in legend_rows:
        for lx, (fill, step_name, share, swatch) in legend_row:
            add(
                f'<rect x="{lx:.1f}" y="{ly - 10:.1f}" width="{swatch:g}" height="12" rx="2" '
                f'fill="{fill}"/>'
            )
            add(
                f'<text x="{lx + swatch + 6:.1f}" y="{ly:.1f}"><tspan font-weight="bold">'
                f"{escape(step_name)}"
                f'</tspan> <tspan fill="#555">{escape(share)}</tspan></text>'
            )
        ly += 20.0
    fx = left + plot_w - 150
    add(
        f'<rect x="{fx:.1f}" y="{ly - 30:.1f}" width="18" height="12" fill="url(#fail-hatch)" '
        f'stroke="{FAIL}" stroke-width="1.5"/>'
    )
    add(f'<text x="{fx + 24:.1f}" y="{ly - 20:.1f}" fill="{FAIL}">failed: {failed}</text>')

    plot_h = n_rows * row_h
    # zebra stripes and row labels (every k-th row when rows are thin)
    every = next(k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10**9) if k * row_h >= 13)
    for li, i in row_of.items():
        y = top + i * row_h
        if i % 2 == 0:
            add(
                f'<rect x="{left}" y="{y:.2f}" width="{plot_w:.1f}" height="{row_h:.2f}" '
                f'fill="#f4f6f8"/>'
            )
        if li % every == 0:
            mark = " …" if li in unfinished else ""
            add(
                f'<text x="{left - 8}" y="{y + row_h / 2 + 4:.2f}" text-anchor="end" '
                f'font-size="{min(12.0, max(9.0, row_h - 2)):.0f}" fill="#333">'
                f"loop {li}{mark}</text>"
            )
    # the time axis: gridlines and labels, none inside a cut-out gap
    step = _nice_step(axis.shown_seconds, int(plot_w // 110))
    last_label = -1e9
    t = 0.0
    while t <= axis.t_end + 1e-9 and t / step < 10_000:
        if not axis.in_gap(t):
            gx = axis.x(t)
            add(
                f'<line x1="{gx:.1f}" y1="{top:.1f}" x2="{gx:.1f}" y2="{top + plot_h:.1f}" '
                f'stroke="#dde1e6"/>'
            )
            if gx - last_label > 60:
                add(
                    f'<text x="{gx:.1f}" y="{top + plot_h + 18:.1f}" text-anchor="middle" '
                    f'fill="#444">{_tick_label(t, step)}</text>'
                )
                last_label = gx
        t += step
    add(
        f'<line x1="{left}" y1="{top + plot_h:.1f}" x2="{left + plot_w:.1f}" '
        f'y2="{top + plot_h:.1f}" stroke="#888"/>'
    )
    add(
        f'<text x="{left + plot_w:.1f}" y="{top + plot_h + 36:.1f}" text-anchor="end" '
        f'fill="#666">time since the first step</text>'
    )
    for start, end in axis.gaps:
        gx = axis.x(start)
        add(
            f'<rect x="{gx:.1f}" y="{top - 4:.1f}" width="{_Axis.GAP_PX:.1f}" '
            f'height="{plot_h + 8:.1f}" '
            f'fill="#ffffff" stroke="#999" stroke-dasharray="3,3"/>'
        )
        add(
            f'<text x="{gx + _Axis.GAP_PX / 2:.1f}" y="{top - 8:.1f}" text-anchor="middle" '
            f'font-size="10" fill="#666">idle {escape(format_seconds(end - start))}</text>'
        )
    # the bars
    pad = max(0.5, row_h * 0.12)
    for b in bars:
        x0, x1 = axis.x(b.start), axis.x(b.end)
        y = top + row_of[b.loop_idx] * row_h + pad
        h = row_h - 2 * pad
        w = max(x1 - x0, 1.0)
        tip = f"loop {b.loop_idx} · {b.step_name} · {format_seconds(b.end - b.start)}"
        if b.waited:
            tip += f" ({format_seconds(b.waited)} {WAITING})"
        if by_cost:
            tip += f" · cost {format_cost(b.cost)} ({b.tokens:,} tokens)"
        if b.error:
            tip += f"\nfailed: {b.error}"
        elif b.output:
            tip += f"\n{b.output}"
        add(f"<g><title>{escape(tip)}</title>")
        add(
            f'<rect x="{x0:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" fill="{fill_of(b)}"/>'
        )
        for ws, we in b.waits:
            wx0, wx1 = axis.x(ws), axis.x(we)
            add(
                f'<rect class="wait" x="{wx0:.2f}" y="{y:.2f}" width="{max(wx1 - wx0, 1.0):.2f}" '
                f'height="{h:.2f}" fill="{WAIT}"/>'
            )
        if b.error:
            add(
                f'<rect x="{x0:.2f}" y="{y:.2f}" width="{max(w, 3.0):.2f}" height="{h:.2f}" '
                f'fill="url(#fail-hatch)" stroke="{FAIL}" stroke-width="1.5"/>'
            )
        add("</g>")
    if not bars:
        add(
            f'<text x="{left + plot_w / 2:.1f}" y="{top + 20:.1f}" text-anchor="middle" '
            'fill="#666">'
            "no finished step yet</text>"
        )
    add("</svg>")
    return "\n".join(out) + "\n"
