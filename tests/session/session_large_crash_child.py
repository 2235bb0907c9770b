"""One life of a run with a large state, for the SIGKILL test of test_session_v02.py.

``python session_large_crash_child.py '<json>'`` resumes the run in ``trace`` if a step file
exists there (else starts it, with the budget ``loops``) and runs it to its end, consuming
its results in the gateway's form (``async for r in loop.run()``) and appending
``"<loop> <step>"`` to the file ``delivered`` for each result it receives. The test kills
this process (and its process group) at a moment of its choosing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: looplib
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/session/

import anyio
from session_loops import LargeCrashLoop, mark

from rdagent_loop import LoopSettings


def life(cmd: dict[str, Any]) -> None:
    trace = Path(cmd["trace"])
    if any((trace / "__session__").glob("[0-9]*/*_*")):
        loop = LargeCrashLoop.load(trace)
        budget: dict[str, int] = {}  # the saved budget carries on
    else:
        settings = LoopSettings(
            trace_path=trace,
            progress=False,
            durability=cmd["durability"],
            step_semaphore=cmd["parallel"],
            # coding in a thread; record (the last step) inline, as by default: a thread
            # step that changes self is seen half done by a sibling's snapshot (README)
            step_executor={"coding": "thread"},
        )
        loop = LargeCrashLoop(
            settings,
            starts=cmd["starts"],
            side=cmd["side"],
            out_size=cmd["out_size"],
            big=cmd["big"],
            many=cmd["many"],
            blob=cmd["blob"],
        )
        budget = {"loop_n": cmd["loops"]}

    async def consume() -> None:
        async for r in loop.run(**budget):
            mark(cmd["delivered"], r.loop_idx, r.step_idx)

    anyio.run(consume, backend=cmd["backend"])


if __name__ == "__main__":
    life(json.loads(sys.argv[1]))
