"""Run ``python -m rdagent_loop`` as a user would: a child process, in a folder of its own."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Screen:
    """What a command run on a terminal showed: standard error as the terminal got it."""

    text: str  # with the escape sequences that redraw the live block
    stdout: str
    returncode: int

    def headers(self) -> list[str]:
        """Every header line of the live block drawn, in order."""
        return [
            line for line in re.split(r"[\r\n]|\x1b\[\d*[FJ]", self.text) if " · steps " in line
        ]

    def counts(self) -> list[tuple[int, int | None, int]]:
        """``(steps done, step total or None, loops done)`` of every header."""
        found = []
        for line in self.headers():
            m = re.search(r" · steps (\d+)(?:/(\d+))? · loops (\d+) done", line)
            assert m is not None, line
            total = int(m.group(2)) if m.group(2) is not None else None
            found.append((int(m.group(1)), total, int(m.group(3))))
        return found


def run_in_pty(*args: str, cwd: Path, timeout: float = 90, **env: str) -> Screen:
    """Run the command with its standard error on a pseudo-terminal (stdout a pipe)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    screen = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], timeout)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other side is closed
                break
            if not chunk:
                break
            screen += chunk
        out, _ = proc.communicate(timeout=timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return Screen(screen.decode(errors="replace"), out.decode(), proc.returncode)
