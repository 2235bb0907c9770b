"""``rdagent-loop`` through its real entry point: run, inspect, timeline, resume, demo, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import (
    assert_consistent,
    cli_command,
    cli_env,
    inspect_json,
    run_cli,
    run_in_pty,
)

from rdagent_loop import list_snapshots

QUANT = "examples.quant_factor:FactorLoop"
PROG = "python -m rdagent_loop"


@pytest.fixture(scope="module")
def quant_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run shared by the read-only tests: 3 loops, 2 in parallel."""
    cwd = tmp_path_factory.mktemp("quant")
    done = run_cli("run", QUANT, "--loop-n", "3", "--parallel", "2", "--trace-path", "t", cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert "finished: 15 steps, 3 loops completed; stopped by loop_n" in done.stdout
    assert f"inspect with: {PROG} inspect t" in done.stdout
    return cwd / "t"


def test_run_prints_every_step_when_not_on_a_terminal(quant_session: Path) -> None:
    meta = json.loads((quant_session / "rdagent-loop.json").read_text())
    assert meta["loop_class"] == "examples.quant_factor.loop:FactorLoop"
    assert len([s for s in list_snapshots(quant_session / "__session__") if s.valid]) == 15


def test_inspect_json(quant_session: Path) -> None:
    report = inspect_json(quant_session, cwd=quant_session.parent)
    assert report["loop_class"] == "examples.quant_factor.loop:FactorLoop"
    assert report["steps"] == ["propose", "coding", "running", "feedback", "record"]
    assert [loop["status"] for loop in report["loops"]] == ["finished"] * 3
    for loop in report["loops"]:
        assert [s["status"] for s in loop["steps"]] == ["done"] * 5
        assert all(s["duration"] >= 0 and s["snapshot_problem"] is None for s in loop["steps"])
        assert "IC" in loop["steps"][2]["output"]  # the back-test's summary line
    assert len(report["snapshots"]) == 15 and all(s["valid"] for s in report["snapshots"])
    assert_consistent(report)


def test_inspect_table(quant_session: Path) -> None:
    done = run_cli("inspect", "t", cwd=quant_session.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "3 loops (3 finished, 0 not)" in lines[0]
    header = next(line for line in lines if line.lstrip().startswith("loop"))
    assert all(name in header for name in ("propose", "coding", "running", "feedback", "record"))
    rows = [
        line
        for line in lines
        if line.split()[:2] in (["0", "finished"], ["1", "finished"], ["2", "finished"])
    ]
    assert len(rows) == 3 and all(row.count("ok ") == 5 for row in rows)


def test_timeline_svg(quant_session: Path) -> None:
    done = run_cli("timeline", "t", "-o", "chart/t.svg", cwd=quant_session.parent)
    assert done.returncode == 0, done.stderr
    svg = (quant_session.parent / "chart" / "t.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "http" not in svg.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert svg.count("<title>loop ") == 15  # one bar per step
    for name in ("propose", "coding", "running", "feedback", "record"):
        assert f">{name}</tspan>" in svg  # the legend


def test_inspect_flags_a_corrupt_snapshot(quant_session: Path, tmp_path: Path) -> None:
    copy = tmp_path / "t"
    shutil.copytree(quant_session, copy)
    newest = list_snapshots(copy / "__session__")[-1]
    newest.path.write_bytes(newest.path.read_bytes()[:40])  # a torn write
    done = run_cli("inspect", "t", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(1 corrupt)" in done.stdout
    assert "!corrupt" in done.stdout
    report = inspect_json(copy, cwd=tmp_path)
    bad = [s for s in report["snapshots"] if not s["valid"]]
    assert [b["path"] for b in bad] == [str(newest.path.relative_to(copy / "__session__"))]
    assert report["loaded_from"] != bad[0]["path"]
    cell = report["loops"][newest.loop_idx]["steps"][newest.step_idx]
    assert cell["snapshot_problem"]


def test_resume_a_step_budget_into_a_fork(cli: Callable[..., Any], tmp_path: Path) -> None:
    done = cli("run", QUANT, "--step-n", "7", "--trace-path", "t")
    assert done.returncode == 0, done.stderr
    assert "stopped by step_n" in done.stdout
    assert f"resume with: {PROG} resume t" in done.stdout
    before = sorted(s.path.name for s in list_snapshots(tmp_path / "t" / "__session__"))
    assert len(before) == 7

    done = cli("resume", "t", "--checkout", "fork", "--loop-n", "2")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith(
        "resumed examples.quant_factor.loop:FactorLoop from snapshot 1/1_coding"
    )
    assert "(the original stays as it is)" in first
    assert "1 loop finished, 1 unfinished (loop 1 at running)" in done.stdout
    assert "finished: 8 steps, 2 loops completed" in done.stdout
    after = sorted(s.path.name for s in list_snapshots(tmp_path / "t" / "__session__"))
    assert after == before
    report = inspect_json(tmp_path / "fork", cwd=tmp_path)
    assert [loop["status"] for loop in report["loops"]] == ["finished"] * 3
    assert_consistent(report)


def test_demo_runs_the_data_science_example(cli: Callable[..., Any], tmp_path: Path) -> None:
    done = cli("demo", "--loop-n", "2", "--parallel", "2", "--llm-latency", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "running examples.data_science.loop:DataScienceLoop: 2 loops, 2 in parallel"
    )
    assert "finished: 10 steps, 2 loops completed; stopped by loop_n" in done.stdout
    assert "best: loop " in done.stdout
    assert (tmp_path / "demo-session" / "workspace" / "loop_1" / "scores.json").exists()
    again = cli("demo")
    assert again.returncode == 1
    assert again.stderr.strip().splitlines() == [
        f"{PROG}: error: demo-session already holds a session: continue it with "
        f"`{PROG} resume demo-session`, or start over with --overwrite"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "examples.quant_factor:Nope"],
            "module 'examples.quant_factor' has no class 'Nope'",
        ),
        (["run", "no_such_module:Loop"], "cannot import module 'no_such_module'"),
        (["run", "examples.quant_factor.market:Market"], "is not a LoopBase subclass"),
        (["run", "examples.quant_factor"], "expected MODULE:CLASS"),
        (["run", QUANT, "--timeout", "2 hours"], "'2 hours'"),
        (["run", QUANT, "--parallel", "0"], "--parallel"),
        (["inspect", "missing"], "no session at missing"),
        (["resume", "missing"], "no session at missing"),
        (["timeline", "."], "no session at ."),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_errors_are_one_clear_line(cli: Callable[..., Any], args: list[str], message: str) -> None:
    done = cli(*args)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{PROG}: error: ")
    assert message in lines[0]


def test_live_display_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal, a live block (loops in flight, steps, time) is redrawn in place."""
    screen = run_in_pty(
        "run", QUANT, "--loop-n", "3", "--parallel", "2", "--trace-path", "t", cwd=tmp_path
    )
    assert screen.returncode == 0
    text = screen.text
    assert "\x1b[" in text  # redrawn in place
    assert "FactorLoop · steps " in text and "/15" in text
    assert "in flight" in text and "time left" in text
    assert "loop    0 " in text  # a line for a loop in flight
    assert "loop 2 done: " in text  # finished loops stay on the screen
    assert "finished: 15 steps" in screen.stdout


def test_a_class_without_a_settings_argument_gets_the_command_line_settings(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    """Its settings come from the environment; the command line's still apply, in place."""
    (tmp_path / "own.py").write_text(
        "from rdagent_loop import LoopBase, LoopSettings\n"
        "class Bare(LoopBase):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "    async def a(self, prev_out): return 1\n"
        "    async def b(self, prev_out): return 2\n"
        "class Own(Bare):\n"
        "    def __init__(self):\n"
        "        LoopBase.__init__(self, LoopSettings(trace_path='elsewhere'))\n"
    )
    for name in ("Bare", "Own"):
        done = cli("run", f"own:{name}", "--loop-n", "3", "--parallel", "2", "--trace-path", name)
        assert done.returncode == 0, done.stderr
        assert f"running own:{name}: 3 loops, 2 in parallel" in done.stdout
        assert len(list_snapshots(tmp_path / name / "__session__")) == 6
        report = inspect_json(tmp_path / name, cwd=tmp_path)
        assert [loop["status"] for loop in report["loops"]] == ["finished"] * 3
    assert not (tmp_path / "elsewhere").exists()
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["run", QUANT, "--loop-n", "1", "--backend", "trio"],
        ["demo", "--loop-n", "1", "--backend", "trio"],
    ],
)
def test_a_missing_backend_names_our_extra_and_creates_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    hidden = tmp_path / "no-trio"
    hidden.mkdir()
    (hidden / "trio.py").write_text("raise ModuleNotFoundError(\"No module named 'trio'\")\n")
    work = tmp_path / "work"
    work.mkdir()
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hidden), env["PYTHONPATH"]])
    done = subprocess.run(
        cli_command(*args), cwd=work, env=env, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"{PROG}: error: --backend trio needs trio, which is not installed: "
        "pip install 'rdagent_loop[trio]'"
    ]
    assert list(work.iterdir()) == []  # no log/<date-time>/, no demo-session/


BOOM = (
    "from rdagent_loop import LoopBase\n"
    "class Boom(LoopBase):\n"
    "    async def a(self, prev_out): return 1\n"
    "    async def b(self, prev_out): raise ValueError('boom')\n"
)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["resume", "missing", "--debug"], "SessionError: no session at missing"),
        (["--debug", "resume", "missing"], "SessionError: no session at missing"),
        (["inspect", "missing", "--debug"], "SessionError: no session at missing"),
        (["timeline", "--debug", "missing"], "SessionError: no session at missing"),
        (["run", "no_such_module:Loop", "--debug"], "ModuleNotFoundError: No module named"),
        (["run", "boom:Boom", "--loop-n", "1", "--debug"], "ValueError: boom"),
        (["demo", "--resume", "missing", "--debug"], "SessionError: no session at missing"),
    ],
)
def test_debug_anywhere_shows_the_traceback(
    cli: Callable[..., Any], tmp_path: Path, args: list[str], shown: str
) -> None:
    (tmp_path / "boom.py").write_text(BOOM)
    done = cli(*args)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert shown in done.stderr
    assert f"{PROG}: error: " in done.stderr
    assert "No such option" not in done.stderr
    without = cli(*[a for a in args if a != "--debug"])
    assert without.returncode == 1
    assert "Traceback" not in without.stderr


def test_a_run_that_saved_nothing_offers_no_commands(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    done = cli("run", QUANT, "--loop-n", "0", "--trace-path", "t")
    assert done.returncode == 0, done.stderr
    assert "finished: 0 steps" in done.stdout
    assert "nothing ran: no step completed, so nothing was saved" in done.stdout
    assert f"{PROG} resume" not in done.stdout and f"{PROG} inspect" not in done.stdout
    assert not (tmp_path / "t").exists()  # nothing left behind either


def test_inspect_says_1_loop(cli: Callable[..., Any], tmp_path: Path) -> None:
    done = cli("run", QUANT, "--loop-n", "1", "--step-n", "2", "--trace-path", "t")
    assert done.returncode == 0, done.stderr
    done = cli("inspect", "t")
    assert done.returncode == 0, done.stderr
    assert " · 1 loop (0 finished, 1 not) · 2 snapshots" in done.stdout.splitlines()[0]
    done = cli("timeline", "t", "-o", "t.svg")
    assert done.stdout.strip() == "wrote t.svg: 1 loop, 2 steps"


def demo_proposals(cli: Callable[..., Any], tmp_path: Path, trace: str, *args: str) -> list[str]:
    done = cli("demo", "--loop-n", "4", "--llm-latency", "0", "--trace-path", trace, *args)
    assert done.returncode == 0, done.stderr
    report = inspect_json(tmp_path / trace, cwd=tmp_path)
    return [loop["steps"][0]["output"] for loop in report["loops"]]


def test_the_demo_proposes_by_its_seed(cli: Callable[..., Any], tmp_path: Path) -> None:
    """The same seed, the same proposals: also one loop at a time against three at once."""
    one = demo_proposals(cli, tmp_path, "a", "--seed", "3", "--parallel", "1")
    assert len(one) == 4 and one[0] == "mean"
    assert demo_proposals(cli, tmp_path, "b", "--seed", "3", "--parallel", "3") == one
    other = demo_proposals(cli, tmp_path, "c", "--seed", "4", "--parallel", "3")
    assert other != one
