"""Run ``python -m rdagent_loop`` as a user would: a child process, in a folder of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def cli_env(**extra: str) -> dict[str, str]:
    """The command's environment: the repository importable (for ``examples``), wide output."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    env.pop("RDAGENT_LOOP_TRACE_PATH", None)
    return env | extra


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "rdagent_loop", *args]


def run_cli(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def inspect_json(session: Path, cwd: Path) -> dict[str, Any]:
    done = run_cli("inspect", str(session), "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def assert_consistent(report: dict[str, Any]) -> None:
    """No step ran twice, none was lost: every loop's finished steps are 0, 1, 2, ... in order."""
    for loop in report["loops"]:
        done = [s["step_idx"] for s in loop["steps"] if s["status"] in ("done", "failed")]
        assert done == sorted(set(done)), loop
        if loop["status"] == "finished":
            assert done[0] == 0
