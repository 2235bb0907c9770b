"""A script without ``if __name__ == "__main__":`` gets one clear line, not nested runs.

Workers import the main script as ``multiprocessing`` does; without the guard that import
starts a run inside the worker. These run real script files as the user would, with
``python script.py``, in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GUARD = 'keep the script\'s entry point under `if __name__ == "__main__":`'

LOOP = textwrap.dedent(
    """\
    import anyio
    from rdagent_loop import LoopBase, LoopSettings

    class MyLoop(LoopBase):
        async def propose(self, prev_out):
            return 1

        def coding(self, prev_out):  # a sync middle step: the process pool in parallel mode
            return 2

        def record(self, prev_out):
            return 3

    """
)
MAIN = textwrap.dedent(
    """\
    loop = MyLoop(LoopSettings(step_semaphore=2, trace_path="t", progress=False))
    print(anyio.run(lambda: loop.run(loop_n=2), backend="{backend}"))
    """
)


def run_script(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(text)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_script_without_the_guard_is_told_to_add_it(tmp_path: Path, backend: str) -> None:
    done = run_script(tmp_path, LOOP + MAIN.format(backend=backend))
    assert done.returncode == 1
    last = [line for line in done.stderr.splitlines() if "WorkerCrashedError: " in line]
    assert len(last) == 1, done.stderr
    assert "step 'coding' of loop " in last[0]
    assert "app.py again" in last[0] and "started a run" in last[0]
    assert "define loop classes at module level" in last[0] and GUARD in last[0]
    # no run inside the worker, no runs inside its workers: one traceback, the script's own
    assert done.stderr.count("Traceback (most recent call last)") == 1, done.stderr
    assert "Can't get attribute" not in done.stderr
    assert len(done.stderr.splitlines()) < 60


def test_the_same_script_with_the_guard_runs(tmp_path: Path) -> None:
    main = "if __name__ == '__main__':\n" + textwrap.indent(MAIN.format(backend="asyncio"), "    ")
    done = run_script(tmp_path, LOOP + main)
    assert done.returncode == 0, done.stderr
    assert "6 steps, 2 loops completed" in done.stdout
    assert done.stderr == ""


def test_a_class_the_worker_cannot_find_in_main_is_named(tmp_path: Path) -> None:
    """Defined under the guard, the class is not there when the worker imports the script."""
    main = "if __name__ == '__main__':\n" + textwrap.indent(
        LOOP + MAIN.format(backend="asyncio"), "    "
    )
    done = run_script(tmp_path, main)
    assert done.returncode == 1
    last = [line for line in done.stderr.splitlines() if "WorkerCrashedError: " in line]
    assert len(last) == 1, done.stderr
    assert "cannot load the step's class from the main module" in last[0]
    assert "'MyLoop'" in last[0] and GUARD in last[0]
