"""The crash test's child: a zygote that forks one process per "life" of a run.

Started once by the test with every module imported, it reads JSON commands on stdin:

* ``{"op": "life", ...}``: fork a child that resumes (or starts) the run described and
  exits 0 when it is done; answer ``{"pid": ...}``. The child is not reaped yet, so its pid
  cannot be reused before the test has sent its SIGKILL.
* ``{"op": "reap"}``: wait for that child; answer ``{"code": ..., "signal": ...}``.
* ``{"op": "exit"}``.

Forking a process that imported everything makes each life start in milliseconds, so a test
can kill many runs in a few seconds. The zygote never starts an event loop or a thread.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import trio  # noqa: F401  (imported before forking, like everything the children use)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: looplib
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/session/

from session_loops import CrashLoop

from rdagent_loop import LoopSettings, list_snapshots


def life(cmd: dict[str, Any]) -> None:
    """Resume the run in ``cmd["trace"]`` (or start it) and run it to the end."""
    trace = Path(cmd["trace"])
    if list_snapshots(trace / "__session__"):
        loop = CrashLoop.load(trace)
        budget: dict[str, int] = {}
    else:
        settings = LoopSettings(
            trace_path=trace,
            progress=False,
            durability=cmd["durability"],
            step_semaphore=cmd["parallel"],
            step_executor="inline",
        )
        loop = CrashLoop(settings, cmd["side"])
        budget = {"loop_n": cmd["loops"]}
    anyio.run(lambda: loop.run(**budget), backend=cmd["backend"])


def main() -> None:
    child = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "life":
            child = os.fork()
            if child == 0:
                log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                code = 0
                try:
                    life(cmd)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            answer: dict[str, Any] = {"pid": child}
        elif cmd["op"] == "reap":
            _, status = os.waitpid(child, 0)
            answer = {
                "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            }
        else:
            return
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
