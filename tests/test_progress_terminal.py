"""The progress bar in a real terminal (a pty): the application's own lines stay whole.

A script prints every result of ``async for r in loop.run(...)``, as the README does, with
standard output and standard error on one pseudo-terminal. The screen is rebuilt from
what the terminal received (carriage returns and erase-line sequences applied), and every
line the script printed must be there, whole, on a line of its own.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import anyio
    from rdagent_loop import LoopBase, LoopSettings

    class Chain(LoopBase):
        async def s0(self, prev_out):
            await anyio.sleep(0.01)
            return "a"

        async def s1(self, prev_out):
            await anyio.sleep(0.01)
            return "b"

        async def s2(self, prev_out):
            return "c"

    async def main():
        settings = LoopSettings(trace_path=sys.argv[1], step_semaphore=2, durability="flush")
        async for r in Chain(settings).run(loop_n=6):
            print(f"RESULT loop {r.loop_idx} step {r.step_idx} {r.step_name} -> {r.output}")
            await anyio.sleep(0.02)  # the application takes its time; the engine goes on
        print("DONE")

    anyio.run(main, backend=sys.argv[2])
    """
)


def _screen(raw: bytes) -> list[str]:
    """The lines a terminal shows after receiving ``raw`` (CR, CSI K and cursor-up applied)."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    lines: list[list[str]] = [[]]
    row, col = 0, 0
    for token in re.findall(r"\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\x1b\r\n]", text):
        if token == "\n":
            row += 1
            col = 0
            if row == len(lines):
                lines.append([])
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b["):
            if token.endswith("K"):  # erase to the end of the line
                del lines[row][col:]
            elif token.endswith("A"):  # cursor up
                row = max(0, row - int(token[2:-1] or 1))
        else:
            line = lines[row]
            line.extend(" " * (col - len(line)))
            if col < len(line):
                line[col] = token
            else:
                line.append(token)
            col += 1
    return ["".join(line).rstrip() for line in lines]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_script_that_prints_every_result_keeps_its_lines_whole(
    tmp_path: Path, backend: str
) -> None:
    script = tmp_path / "app.py"
    script.write_text(SCRIPT)
    controller, terminal = pty.openpty()
    # a terminal of 40 rows x 120 columns (a new pty has 0 x 0, where tqdm draws nothing)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDAGENT_LOOP_")}
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "trace"), backend],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        close_fds=True,
    )
    os.close(terminal)
    raw = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the script exited and the terminal closed
            break
        if not chunk:
            break
        raw += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0, raw.decode(errors="replace")

    screen = _screen(bytes(raw))
    printed = [line for line in screen if "RESULT" in line]
    assert len(printed) == 18, screen
    pattern = re.compile(r"RESULT loop \d step \d s\d -> [abc]")
    assert all(pattern.fullmatch(line) for line in printed), printed
    assert "DONE" in screen
    assert b"run:" in raw  # the bar was shown while the script waited for results
    # no bar left behind: after the last line the script printed, nothing but blank lines
    assert all(not line for line in screen[screen.index("DONE") + 1 :]), screen
