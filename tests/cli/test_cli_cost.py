"""Cost budgets from the command line: ``--cost`` stops a run once its steps have charged
that much (``loop.charge``) and the last lines say so; a resume keeps what was spent; the
live display shows money spent and left; ``inspect`` shows cost and tokens per loop and in
total; ``timeline --color-by cost`` colours steps by what they charged. The examples charge
for their simulated model calls (a replay is not charged again: tests/examples).
"""

from __future__ import annotations

import io
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest
from cli_helpers import inspect_json, run_cli, run_in_pty

from rdagent_loop import LoopBase, LoopSettings, list_snapshots
from rdagent_loop._inspect import LoopRow, SessionReport, StepRow
from rdagent_loop._live import LiveDisplay
from rdagent_loop._timeline import COST_SCALE, FREE, cost_colour, format_cost, render_svg
from rdagent_loop.cli._driver import _drive, more_budget

QUANT = "examples.quant_factor:FactorLoop"
PROG = "python -m rdagent_loop"
SVG = "{http://www.w3.org/2000/svg}"
# the run's summary: "..., cost 0.022512 (4544 tokens)"
SUMMARY_COST = re.compile(r"^finished: .*, cost ([0-9.e+-]+) \((\d+) tokens\)", re.MULTILINE)


def summary_cost(stdout: str) -> tuple[float, int]:
    found = SUMMARY_COST.search(stdout)
    assert found is not None, stdout
    return float(found.group(1)), int(found.group(2))


@pytest.fixture(scope="module")
def cost_session(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A quant run stopped by ``--cost 0.02`` (its model calls cost about 0.005 each);
    ``--loop-n 10`` so that a budget which never stops it ends the run all the same."""
    cwd = tmp_path_factory.mktemp("cost")
    done = run_cli("run", QUANT, "--cost", "0.02", "--loop-n", "10", "--trace-path", "t", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "t", done.stdout


def test_cost_stops_the_run_and_the_last_lines_say_so(cost_session: tuple[Path, str]) -> None:
    trace, stdout = cost_session
    assert "a cost budget of 0.02; session in t" in stdout  # the first line
    assert "; stopped by all_cost" in stdout
    cost, tokens = summary_cost(stdout)
    assert 0.02 <= cost < 0.03 and tokens > 0  # the call that crossed the budget is paid
    spent = next(line for line in stdout.splitlines() if line.startswith("spent: "))
    assert re.fullmatch(
        r"spent: [0-9.]+ \([0-9,]+ tokens\) in this run; the session's total [0-9.]+ "
        r"\([0-9,]+ tokens\) of a budget of 0\.02, 0 left",
        spent,
    ), spent
    assert (
        "the cost budget is spent; resume with a larger one (--cost caps the session's total, "
        f"what it spent so far included): {PROG} resume t --cost {more_budget(0.02, cost)}"
    ) in stdout
    assert "run more loops with" not in stdout
    report = inspect_json(trace, cwd=trace.parent)
    assert report["spending"]["limit"] == 0.02
    assert report["spending"]["cost"] == pytest.approx(cost)
    assert report["spending"]["tokens"] == tokens
    assert 1 <= len([loop for loop in report["loops"] if loop["status"] == "finished"]) < 10


def test_resume_keeps_what_was_spent(cost_session: tuple[Path, str], tmp_path: Path) -> None:
    shutil.copytree(cost_session[0], tmp_path / "t")
    before = inspect_json(tmp_path / "t", cwd=tmp_path)["spending"]
    snapshots = len(list_snapshots(tmp_path / "t" / "__session__"))

    spent = format_cost(before["cost"])

    # the budget saved with the session is spent: the resume says so, and runs nothing
    done = run_cli("resume", "t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"; spent {spent} ({before['tokens']:,} tokens) of a budget of 0.02, 0 left" in (
        done.stdout
    )
    assert (
        f"the session's cost budget of 0.02 is spent ({spent}): pass a larger one to go on, "
        f"as in `{PROG} resume t --cost {more_budget(0.02, before['cost'])}`"
    ) in done.stdout
    assert "finished:" not in done.stdout
    # a budget no larger than what was spent: an error that says why
    done = run_cli("resume", "t", "--cost", "0.02", cwd=tmp_path)
    assert done.returncode == 1
    assert f"--cost 0.02 is not more than the {spent} the session has spent" in done.stderr
    assert len(list_snapshots(tmp_path / "t" / "__session__")) == snapshots

    # a larger one: the run goes on from what was spent, and stops at the new budget
    done = run_cli("resume", "t", "--cost", "0.05", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"; spent {spent} (" in done.stdout  # the resumed line: what the session had spent
    assert "; stopped by all_cost" in done.stdout
    cost, tokens = summary_cost(done.stdout)
    line = next(line for line in done.stdout.splitlines() if line.startswith("spent: "))
    assert line == (
        f"spent: {format_cost(cost)} ({tokens:,} tokens) in this run; the session's total "
        f"{format_cost(before['cost'] + cost)} ({before['tokens'] + tokens:,} tokens) of a "
        "budget of 0.05, 0 left"
    )
    assert f"{PROG} resume t --cost {more_budget(0.05, before['cost'] + cost)}" in done.stdout
    # saved with the session: the new budget, and at least what was spent before
    after = inspect_json(tmp_path / "t", cwd=tmp_path)["spending"]
    assert after["limit"] == 0.05
    assert before["tokens"] < after["tokens"] <= before["tokens"] + tokens


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "", "0.5$"])
def test_a_bad_cost_is_a_usage_error_naming_it(
    cli: Callable[..., Any], tmp_path: Path, value: str
) -> None:
    done = cli("run", QUANT, "--cost", value, "--trace-path", "t")
    assert done.returncode == 2, done.stdout
    assert (
        f"Invalid value for '--cost': must be a number >= 0 (or inf, for no limit), got {value!r}"
    ) in done.stderr
    assert not (tmp_path / "t").exists()


def test_a_bad_cost_on_resume_is_a_usage_error_too(
    cost_session: tuple[Path, str], cli: Callable[..., Any]
) -> None:
    done = cli("resume", str(cost_session[0]), "--cost", "-0.5")
    assert done.returncode == 2
    assert "Invalid value for '--cost'" in done.stderr and "'-0.5'" in done.stderr


def test_inspect_shows_cost_per_loop_and_in_total(cost_session: tuple[Path, str]) -> None:
    trace = cost_session[0]
    report = inspect_json(trace, cwd=trace.parent)
    loops = report["loops"]
    for loop in loops:
        steps = loop["steps"]
        assert loop["cost"] == pytest.approx(sum(s["cost"] for s in steps))
        assert loop["tokens"] == sum(s["tokens"] for s in steps)
        # the model calls are made in propose and coding; the back-test charges nothing
        charged = {s["step_name"] for s in steps if s["cost"]}
        assert charged <= {"propose", "coding"} and "propose" in charged
        assert all(s["tokens"] > 0 for s in steps if s["cost"])
    assert report["cost"] == pytest.approx(sum(loop["cost"] for loop in loops)) and report["cost"]
    assert report["tokens"] == sum(loop["tokens"] for loop in loops)
    # every charge was made by a step that completed: the session's total is the same
    assert report["spending"]["cost"] == pytest.approx(report["cost"])

    done = run_cli("inspect", "t", cwd=trace.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f" · cost {format_cost(report['cost'])} ({report['tokens']:,} tokens)" in lines[0]
    assert "; the session spent " in lines[1] and "of a budget of 0.02, 0 left" in lines[1]
    header = next(line for line in lines if line.lstrip().startswith("loop"))
    assert re.search(r"time\s+cost\s+result$", header), header
    for loop in loops:
        row = next(line for line in lines if line.split()[:1] == [str(loop["loop_idx"])])
        assert f"  {format_cost(loop['cost'])}  " in row, row


def test_timeline_colours_steps_by_cost_with_a_legend(cost_session: tuple[Path, str]) -> None:
    trace = cost_session[0]
    done = run_cli("timeline", "t", "--color-by", "cost", "-o", "cost.svg", cwd=trace.parent)
    assert done.returncode == 0, done.stderr
    svg = (trace.parent / "cost.svg").read_text()
    root = ET.fromstring(svg)
    gradient = root.find(f".//{SVG}linearGradient[@id='cost-scale']")
    assert gradient is not None
    assert [s.get("stop-color") for s in gradient] == list(COST_SCALE)
    assert '<tspan font-weight="bold">cost per step</tspan>' in svg
    assert re.search(r"[0-9.]+ \(cheapest\) → [0-9.]+ \(dearest\)", svg)
    assert '<tspan font-weight="bold">no charge</tspan>' in svg
    # each bar: its fill and its cost, from its tooltip
    fills: dict[str, float] = {}
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        if title is None:
            continue
        found = re.search(r" · cost ([0-9.e-]+) \(", title.text or "")
        assert found is not None, title.text
        fills[g.find(f"{SVG}rect").get("fill")] = float(found.group(1))  # type: ignore[union-attr]
    report = inspect_json(trace, cwd=trace.parent)
    costs = [s["cost"] for loop in report["loops"] for s in loop["steps"] if s["started_at"]]
    charged = [c for c in costs if c]
    assert fills[FREE] == 0 and len(fills) > 3
    assert COST_SCALE[0] in fills and COST_SCALE[-1] in fills
    assert fills[COST_SCALE[0]] == pytest.approx(min(charged), abs=1e-3)
    assert fills[COST_SCALE[-1]] == pytest.approx(max(charged), abs=1e-3)
    assert f" · cost {format_cost(report['cost'])} ({report['tokens']:,} tokens)" in svg

    done = run_cli("timeline", "t", "-o", "plain.svg", cwd=trace.parent)  # by step: unchanged
    plain = (trace.parent / "plain.svg").read_text()
    assert "cost-scale" not in plain and "cost per step" not in plain and "· cost " not in plain


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_live_display_shows_money_spent_and_left(tmp_path: Path, backend: str) -> None:
    screen = run_in_pty(
        "run", QUANT, "--cost", "0.02", "--loop-n", "10", "--trace-path", "t",
        "--backend", backend, cwd=tmp_path,
    )  # fmt: skip
    assert screen.returncode == 0, screen.text
    assert "; stopped by all_cost" in screen.stdout
    spent = [
        re.search(r" · spent ([0-9.]+) of 0\.02 \(([0-9.]+) left\)$", h) for h in screen.headers()
    ]
    assert spent and all(spent), screen.headers()
    amounts = [(float(m.group(1)), float(m.group(2))) for m in spent if m]
    assert amounts == sorted(amounts, key=lambda a: a[0])  # it only grows
    assert amounts[-1][0] >= 0.02 and amounts[-1][1] == 0
    assert any(0 < cost < 0.02 and left > 0 for cost, left in amounts)

    # without a budget: what was spent, nothing left to say
    screen = run_in_pty("run", QUANT, "--loop-n", "1", "--trace-path", "u", cwd=tmp_path)
    assert screen.returncode == 0, screen.text
    assert re.search(r" · spent [0-9.]+$", screen.headers()[-1]), screen.headers()
    assert not any(" left)" in h for h in screen.headers())


class Charging(LoopBase):
    """Each step charges 1.0 and 100 tokens."""

    async def propose(self, prev_out: dict[str, Any]) -> str:
        self.charge(1.0, tokens=100)
        await anyio.sleep(0.01)
        return "idea"

    async def coding(self, prev_out: dict[str, Any]) -> str:
        self.charge(1.0, tokens=100)
        await anyio.sleep(0.01)
        return "code"


@pytest.mark.anyio
async def test_the_display_reads_the_spending_of_a_run(tmp_path: Path) -> None:
    """The command's driver and display, fed by a real run that a budget of 3 stops."""
    settings = LoopSettings(trace_path=tmp_path / "t", progress=False, durability="flush")
    loop = Charging(settings)
    out = io.StringIO()
    display = LiveDisplay(loop, out, interactive=False, loop_n=10, cost_limit=3)
    assert display.spent() == "spent 0 of 3 (3 left)"  # before the first step
    ended = await _drive(loop, display, {"loop_n": 10, "all_cost": 3})
    assert ended.error is None and ended.summary is not None, ended.error
    assert ended.summary.reason == "all_cost" and ended.summary.cost == 3
    assert display.spent() == "spent 3 of 3 (0 left)"
    assert " · spent 3 of 3 (0 left)" in display.header()
    # the third charge reached the budget: its step was cancelled (no grace period)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("  loop ")]
    assert len(lines) == ended.summary.steps == 2
    for line in lines:  # every step line says what the step cost, and the total so far
        assert re.match(r"  loop \d \w+ \([0-9.]+s, cost 1, [123] of 3 spent\): ", line), line

    # no budget: what was spent; nothing spent and no budget: nothing at all
    free = LiveDisplay(Charging(settings), io.StringIO(), interactive=False)
    assert free.spent() == "" and " spent" not in free.header()
    loop.spending.limit = None
    assert LiveDisplay(loop, io.StringIO(), interactive=False).spent() == "spent 3"


def test_the_examples_charge_for_their_model_calls(
    cost_session: tuple[Path, str], cli: Callable[..., Any]
) -> None:
    """Each example's run reports a non-zero cost: the quant example (above) and the demo
    (the data-science example)."""
    cost, tokens = summary_cost(cost_session[1])
    assert cost > 0 and tokens > 0
    done = cli("demo", "--loop-n", "1", "--llm-latency", "0", "--no-progress", "--trace-path", "d")
    assert done.returncode == 0, done.stderr
    cost, tokens = summary_cost(done.stdout)
    assert cost > 0 and tokens > 1000  # three calls: propose, critique, the training script
    assert f"spent: {format_cost(cost)} ({tokens:,} tokens) in this run" in done.stdout


def _report(costs: list[list[float]]) -> SessionReport:
    """Loops of one-second steps, one after another, charging ``costs[loop][step]``."""
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rows, t = [], 0
    for li, loop_costs in enumerate(costs):
        cells = []
        for si, cost in enumerate(loop_costs):
            start, t = t0 + timedelta(seconds=t), t + 1
            cells.append(
                StepRow(si, f"s{si}", "done", start, t0 + timedelta(seconds=t), "", None,
                        cost=cost, tokens=int(cost * 1000))
            )  # fmt: skip
        rows.append(LoopRow(li, "finished", None, tuple(cells)))
    names = tuple(f"s{i}" for i in range(len(costs[0])))
    return SessionReport(Path("/s"), Path("/s/__session__"), "m:L", names, tuple(rows), (), None)


def _fills(svg: str) -> list[str]:
    root = ET.fromstring(svg)
    return [
        g.find(f"{SVG}rect").get("fill", "")  # type: ignore[union-attr]
        for g in root.iter(f"{SVG}g")
        if g.find(f"{SVG}title") is not None
    ]


def test_the_cost_scale_spans_the_steps_that_charged() -> None:
    svg = render_svg(_report([[0.0, 1.0, 2.0], [0.0, 3.0, 5.0]]), color_by="cost")
    assert _fills(svg) == [FREE, COST_SCALE[0], cost_colour(0.25), FREE, cost_colour(0.5),
                           COST_SCALE[-1]]  # fmt: skip
    assert "1 (cheapest) → 5 (dearest)" in svg and ">no charge</tspan>" in svg
    assert " · cost 11 (11,000 tokens)" in svg
    # one price: one colour, the dearest; nothing charged: every step off the scale
    same = render_svg(_report([[2.0, 2.0]]), color_by="cost")
    assert _fills(same) == [COST_SCALE[-1]] * 2 and "2 for every step that charged" in same
    assert "no charge" not in same
    free = render_svg(_report([[0.0, 0.0]]), color_by="cost")
    assert _fills(free) == [FREE] * 2 and "no step charged anything" in free
    with pytest.raises(ValueError, match="color_by must be 'step' or 'cost', got 'money'"):
        render_svg(_report([[1.0]]), color_by="money")  # type: ignore[arg-type]
