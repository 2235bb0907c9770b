"""The journal crash tests' child: one run of a session, which the test kills or lets end.

``python journal_crash_child.py BACKEND FOLDER CLASS BLOCK_AFTER [EXECUTOR]`` starts a
session in ``FOLDER/trace`` with the loop class ``CLASS`` of ``journal_crash_loops`` (one
loop), under AnyIO's ``BACKEND``; its middle step blocks the first time as ``BLOCK_AFTER``
says. ``EXECUTOR`` names where the middle step runs (``process``: in a worker process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
from journal_crash_loops import LOOPS

from rdagent_loop import LoopSettings


def main() -> None:
    backend, folder, name, block_after = sys.argv[1:5]
    executor = sys.argv[5] if len(sys.argv) > 5 else "inline"
    cls = LOOPS[name]
    settings = LoopSettings(
        trace_path=Path(folder) / "trace",
        progress=False,
        durability="flush",
        step_executor={cls.steps[1]: executor} if executor != "inline" else None,
    )
    loop = cls(settings, Path(folder), int(block_after))
    anyio.run(lambda: loop.run(loop_n=1), backend=backend)


if __name__ == "__main__":  # process workers import this script as __mp_main__
    main()
