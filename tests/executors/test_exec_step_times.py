"""A process step's times measure the step, not the start of its worker.

A worker imports the application's main script before it can run a step; here that import
is slow, and the worker writes the moment it finished. The first process step's
``started_at`` must not be earlier than that moment (it used to include the import).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from rdagent_loop import LoopBase, LoopSettings

    OUT = Path(sys.argv[1])
    if __name__ != "__main__":  # a worker importing the application: slowly
        time.sleep(1.5)
        (OUT / f"imported-{os.getpid()}").write_text(repr(time.time()))

    class Slow(LoopBase):
        def propose(self, prev_out):
            return 0

        def work(self, prev_out):  # a process step
            return os.getpid()

        def record(self, prev_out):
            return 0

    if __name__ == "__main__":
        settings = LoopSettings(trace_path=OUT / "trace", step_semaphore=2, progress=False,
                                durability="flush", process_workers=1)
        loop = Slow(settings)

        async def main():
            return [r async for r in loop.run(loop_n=2)]

        import anyio
        results = anyio.run(main, backend=sys.argv[2])
        work = [r for r in results if r.step_name == "work"]
        print(json.dumps([[r.output, r.started_at.timestamp(), r.ended_at.timestamp()]
                          for r in work]))
    """
)


def _run(tmp_path: Path, backend: str) -> list[list[float]]:
    script = tmp_path / "slow_app.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path), backend],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: list[list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_process_step_is_timed_from_when_its_worker_is_ready(tmp_path: Path) -> None:
    for backend in ("asyncio", "trio"):
        out = tmp_path / backend
        out.mkdir()
        work = _run(out, backend)
        assert len(work) == 2
        for pid, started, ended in work:
            imported = float((out / f"imported-{pid}").read_text())
            assert started >= imported, (started, imported)  # the import is not the step's
            assert started <= ended
