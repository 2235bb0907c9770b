"""The demo through its real entry points, with small budgets.

``python -m rdagent_loop demo`` is the README's main command: whichever demo the command line
offers (the CLI's, or ``rdagent_loop._demo`` without it) must run, save a session and resume
it. ``python -m rdagent_loop._demo`` is the standard-library demo itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rdagent_loop import list_snapshots
from rdagent_loop._demo import HyperSearchLoop

pytestmark = pytest.mark.slow

STEPS = ["propose", "coding", "running", "feedback", "record"]
PROG = "python -m rdagent_loop._demo"

# a seed whose first proposals are small networks that train in a fraction of a second
QUICK_SEED = "34"


def demo(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    return subprocess.run(
        [sys.executable, "-m", "rdagent_loop._demo", "--no-progress", "--seed", QUICK_SEED, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def recorded(session: Path) -> list[int]:
    loop = HyperSearchLoop.load(session)
    return sorted(r.loop_idx for r in loop.history)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_demo_runs_loops_in_parallel_and_saves_a_session(tmp_path: Path, backend: str) -> None:
    done = demo("--loops", "2", "--parallel", "2", "--backend", backend, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    session = tmp_path / "demo-session"
    snapshots = list_snapshots(session / "__session__")
    assert len(snapshots) == 2 * len(STEPS)
    assert all(s.valid for s in snapshots)
    assert {(s.loop_idx, s.step_name) for s in snapshots} == {
        (li, name) for li in range(2) for name in STEPS
    }
    for li in range(2):
        workspace = session / "workspace" / f"loop_{li}"
        assert (workspace / "train.py").is_file()
        assert "accuracy" in (workspace / "run.log").read_text()
    assert recorded(session) == [0, 1]
    assert "2 loops completed" in done.stdout
    assert done.stdout.splitlines()[-1].endswith(f"{PROG} --resume ./demo-session")


def test_resume_continues_where_the_step_budget_stopped(tmp_path: Path) -> None:
    first = demo(
        "--loops", "3", "--parallel", "2", "--steps", "7", "--trace-path", "s", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr
    assert "stopped by step_n" in first.stdout
    assert len(list_snapshots(tmp_path / "s" / "__session__")) == 7
    resume = first.stdout.splitlines()[-1].split(": ", 1)[1]
    assert resume == f"{PROG} --resume s"

    second = demo("--resume", "s", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "stopped by loop_n" in second.stdout
    # the 7 completed steps did not run again: 3 loops x 5 steps in all
    snapshots = list_snapshots(tmp_path / "s" / "__session__")
    assert len(snapshots) == 3 * len(STEPS)
    assert "8 steps, 3 loops completed" in second.stdout
    assert recorded(tmp_path / "s") == [0, 1, 2]

    # a finished session resumed with a budget runs that many more loops, on trio this time
    third = demo("--resume", "s", "--loops", "1", "--backend", "trio", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert recorded(tmp_path / "s") == [0, 1, 2, 3]


def test_refuses_to_overwrite_a_session_unless_asked(tmp_path: Path) -> None:
    assert demo("--loops", "1", "--parallel", "1", cwd=tmp_path).returncode == 0
    again = demo("--loops", "1", "--parallel", "1", cwd=tmp_path)
    assert again.returncode == 2
    assert "--resume ./demo-session" in again.stderr
    fresh = demo("--loops", "1", "--parallel", "1", "--overwrite", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert recorded(tmp_path / "demo-session") == [0]


def test_resume_of_a_missing_session_is_one_clear_line(tmp_path: Path) -> None:
    done = demo("--resume", "nowhere", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("cannot resume:")
    assert "nowhere" in done.stderr


def test_the_readme_main_command_runs_saves_and_resumes(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rdagent_loop", "demo", "--loops", "2", "--parallel", "2"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    session = tmp_path / "demo-session" / "__session__"
    snapshots = list_snapshots(session)
    assert snapshots
    assert all(s.valid for s in snapshots)
    # issue 2: the demo ends with a line saying how to resume it
    assert "resume" in first.stdout.lower(), "the demo's output must say how to resume it"

    more = [sys.executable, "-m", "rdagent_loop", "demo", "--resume", "./demo-session"]
    second = subprocess.run(
        [*more, "--loops", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert len(list_snapshots(session)) > len(snapshots)
