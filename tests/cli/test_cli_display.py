"""The live display's numbers and lines, on a real terminal (a pty) and fed by hand.

A withdraw restores an older state and runs steps again, a skip ends a loop early, and the
display reads results later than the engine made them: through all of that a loop is done
once, its "done" line is printed once, and ``steps X/Y`` never has X past Y.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import anyio
import pytest
from cli_helpers import run_cli, run_in_pty

from rdagent_loop import LoopBase, LoopSettings
from rdagent_loop._live import LiveDisplay

FLAKY = textwrap.dedent(
    """\
    from pathlib import Path

    import anyio

    from rdagent_loop import LoopBase


    class Withdraw(Exception):
        pass


    class Broken(Exception):
        pass


    class Flaky(LoopBase):
        \"\"\"Loop 1 withdraws once, after loop 0 finished (which rolls loop 0 back, so it
        runs three steps again); loop 2 fails at b and skips to d.\"\"\"

        skip_loop_error = (Broken,)
        skip_loop_error_stepname = "d"
        withdraw_loop_error = (Withdraw,)

        async def a(self, prev_out):
            li = prev_out[self.LOOP_IDX_KEY]
            marker = Path(self.settings.trace_path) / "withdrawn"
            if li == 1 and not marker.exists():
                while self.step_idx.get(0, 0) < len(self.steps):
                    await anyio.sleep(0.01)
                marker.write_text("")
                raise Withdraw("loop 1: ask again")
            return f"proposal {li}"

        async def b(self, prev_out):
            await anyio.sleep(0.05)
            if prev_out[self.LOOP_IDX_KEY] == 2:
                raise Broken("no good")
            return "b"

        async def c(self, prev_out):
            await anyio.sleep(0.05)
            return "c"

        async def d(self, prev_out):
            await anyio.sleep(0.05)
            return f"loop {prev_out[self.LOOP_IDX_KEY]}: result"
    """
)
# loop 0: 4 steps and 3 again; loop 1: 4; loop 2: a, b (failed), d
STEPS = 14


def test_withdraw_and_skip_on_a_terminal(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    screen = run_in_pty(
        "run", "flaky:Flaky", "--loop-n", "3", "--parallel", "2", "--trace-path", "t", cwd=tmp_path
    )
    assert screen.returncode == 0, screen.text
    assert f"finished: {STEPS} steps, 3 loops completed" in screen.stdout
    counts = screen.counts()
    assert counts, screen.text
    for done, total, loops in counts:
        assert total is not None and done <= total, screen.headers()
        assert loops <= 3, screen.headers()
    assert counts[-1][0] == counts[-1][1] == STEPS  # the last header drawn: all done
    assert "1 withdrawn" in screen.headers()[-1]
    # one line per finished loop, printed once: loop 0 finished twice (the withdraw rolled
    # its first finish back), and the skipped loop's error is in its line
    for li in range(3):
        assert screen.text.count(f"loop {li} done: ") == 1, screen.text
    line = next(x for x in screen.text.splitlines() if "loop 2 done: " in x)
    assert line.endswith("loop 2 done: result (b failed: Broken: no good)")
    assert "skipping ahead" not in screen.text
    assert "loop 2: b failed" not in screen.text  # not a line of its own


def test_a_resumed_run_shows_its_step_total_and_time_left(tmp_path: Path) -> None:
    first = run_cli(
        "run", "examples.quant_factor:FactorLoop", "--loop-n", "3", "--step-n", "4",
        "--trace-path", "t", cwd=tmp_path,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    # the saved budget: loop 0 at its last step, 2 loops to admit: 1 + 2 x 5 steps
    screen = run_in_pty("resume", "t", cwd=tmp_path)
    assert screen.returncode == 0, screen.text
    assert "finished: 11 steps, 3 loops completed" in screen.stdout
    counts = screen.counts()
    assert counts and all(total == 11 for _, total, _ in counts), screen.headers()
    assert any("time left ~" in h for h in screen.headers())


class Withdraw(Exception):
    pass


class Broken(Exception):
    pass


class Flaky(LoopBase):
    """The same loop as in :data:`FLAKY`, in this module, to feed a display by hand."""

    skip_loop_error = (Broken,)
    skip_loop_error_stepname = "d"
    withdraw_loop_error = (Withdraw,)
    withdrawn = False

    async def a(self, prev_out: dict[str, object]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        if li == 1 and not Flaky.withdrawn:
            while self.step_idx.get(0, 0) < len(self.steps):
                await anyio.sleep(0.01)
            Flaky.withdrawn = True
            raise Withdraw("loop 1: ask again")
        return f"proposal {li}"

    async def b(self, prev_out: dict[str, object]) -> str:
        await anyio.sleep(0.01)
        if prev_out[self.LOOP_IDX_KEY] == 2:
            raise Broken("no good")
        return "b"

    async def c(self, prev_out: dict[str, object]) -> str:
        await anyio.sleep(0.01)
        return "c"

    async def d(self, prev_out: dict[str, object]) -> str:
        await anyio.sleep(0.01)
        return f"loop {prev_out[self.LOOP_IDX_KEY]}: result"


@pytest.mark.anyio
async def test_a_display_behind_the_run_counts_each_loop_once(tmp_path: Path) -> None:
    """Results read after the loop's state moved on (here: after the whole run)."""
    Flaky.withdrawn = False
    settings = LoopSettings(
        trace_path=tmp_path / "t", step_semaphore=2, progress=False, durability="flush"
    )
    loop = Flaky(settings)
    out = io.StringIO()
    display = LiveDisplay(loop, out, interactive=True, loop_n=3)
    run = loop.run(loop_n=3)
    display.attach(run)
    async with run as stream:
        results = [r async for r in stream]
    assert len(results) == STEPS
    for result in results:  # every one of them late
        display.result(result)
        done, total = display.steps_done, display.total_steps()
        assert total is not None and done <= total
        assert display.loops_done <= 3
    assert (display.steps_done, display.total_steps(), display.loops_done) == (STEPS, STEPS, 3)
    text = out.getvalue()
    for li in range(3):
        assert text.count(f"loop {li} done: ") == 1, text
    assert "loop 2 done: result (b failed: Broken: no good)" in text
    assert " · 1 failed" in display.header()
