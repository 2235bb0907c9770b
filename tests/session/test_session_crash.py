"""Crash and resume: SIGKILL a run at random moments, resume it, and compare with a clean run.

A zygote child process (``session_crash_child.py``) forks one process per life of a run. The
test kills each life after a seeded random delay, then checks that the session folder is
loadable and every file in it valid, and notes which steps the newest snapshot shows as done.
Steps append a line to a side file when their body finishes, so a step that ran again after
a kill although a snapshot already showed it as done is caught. At the end the resumed run
must hold exactly what an uninterrupted run holds.

``RDAGENT_LOOP_CRASH_KILLS`` (default 12 per backend) and ``RDAGENT_LOOP_CRASH_SEED`` change
the number of kills and the seed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from session_loops import CrashLoop

from rdagent_loop import list_snapshots

KILLS = int(os.environ.get("RDAGENT_LOOP_CRASH_KILLS", "12"))
SEED = int(os.environ.get("RDAGENT_LOOP_CRASH_SEED", "20240611"))
LOOPS = 10
CHILD = Path(__file__).with_name("session_crash_child.py")


class Zygote:
    """The child process that forks the lives of a run."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def zygote() -> Any:
    z = Zygote()
    yield z
    z.close()


def executions(side: Path) -> list[tuple[int, int]]:
    if not side.exists():
        return []
    return [tuple(map(int, line.split())) for line in side.read_text().splitlines()]  # type: ignore[misc]


def done_steps(trace: Path) -> set[tuple[int, int]]:
    """Steps the newest snapshot shows as done; every file of the session must be valid."""
    infos = list_snapshots(trace / "__session__")
    assert all(i.valid for i in infos), [i for i in infos if not i.valid]
    if not infos:
        return set()
    loop = CrashLoop.load(trace)  # warnings are errors here: nothing may be skipped
    return {(li, si) for li, n in loop.step_idx.items() for si in range(n)}


def run_session(
    zygote: Zygote, root: Path, name: str, backend: str, rng: random.Random | None, **config: Any
) -> tuple[int, CrashLoop, list[tuple[int, int]]]:
    """Run one session to its end, killing lives when ``rng`` is given; return the kills."""
    trace, side, log = root / name, root / f"{name}.side", root / f"{name}.log"
    cmd = {"op": "life", "trace": str(trace), "side": str(side), "log": str(log)}
    cmd.update(backend=backend, loops=LOOPS, **config)
    kills = 0
    while True:
        done = done_steps(trace)
        seen = len(executions(side))
        pid = zygote.ask(**cmd)["pid"]
        if rng is not None:
            time.sleep(rng.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGKILL)
        status = zygote.ask(op="reap")
        again = set(executions(side)[seen:]) & done
        assert not again, f"steps shown done before the kill ran again: {sorted(again)}"
        if status["signal"] == signal.SIGKILL:
            kills += 1
            assert kills < 200, "the run never finishes"
            continue
        assert status["code"] == 0, log.read_text()
        loop = CrashLoop.load(trace)
        return kills, loop, executions(side)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_killed_runs_resume_to_the_state_of_an_uninterrupted_run(
    zygote: Zygote, tmp_path: Path, backend: str
) -> None:
    rng = random.Random(f"{SEED}-{backend}")
    configs = [
        {"parallel": 1, "durability": "flush"},
        {"parallel": 2, "durability": "flush"},
        {"parallel": 2, "durability": "fsync"},
    ]
    references = {}
    for i, config in enumerate(configs):
        _, clean, ran = run_session(zygote, tmp_path, f"clean{i}", backend, None, **config)
        assert sorted(Counter(ran).values()) == [1] * (4 * LOOPS)  # the baseline ran once each
        references[i] = clean
    kills = session = 0
    while kills < KILLS:
        i = session % len(configs)
        found, loop, ran = run_session(
            zygote, tmp_path, f"killed{session}", backend, rng, **configs[i]
        )
        kills += found
        session += 1
        clean = references[i]
        # every loop recorded once, with the same state and outputs as the clean run
        assert sorted(loop.records) == sorted(clean.records) == list(range(LOOPS))
        assert loop.blobs == clean.blobs
        assert dict(loop.step_idx) == dict(clean.step_idx) == {li: 4 for li in range(LOOPS)}
        assert loop.loop_idx == clean.loop_idx == LOOPS
        for li in range(LOOPS):
            assert loop.loop_prev_out[li] == CrashLoop.expected_outputs(li)
            assert loop.loop_prev_out[li] == clean.loop_prev_out[li]
        assert set(ran) == {(li, si) for li in range(LOOPS) for si in range(4)}
