"""A loop class for the upgrade tests, importable by rdagent_loop 0.1 and by today's engine.

``test_session_upgrade.py`` runs :func:`make_old_session` in a child process whose
``rdagent_loop`` is release 0.1 (a worktree of commit 5193743): it writes a format-2
session, then reports what that engine loads back from it, in plain types only (so the
report unpickles without either engine). Nothing here uses an API that changed between the
two versions.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import time
from pathlib import Path
from typing import Any

import anyio

from rdagent_loop import LoopBase, LoopSettings

BIG = 300_000
"""Bytes of the loop's large attribute (chunked by format 2, a blob in format 3)."""
LARGE_OUTPUT = 70_000
"""Bytes of loop 0's ``coding`` output (a blob in format 3, in its record)."""


def big_bytes() -> bytes:
    return random.Random(7).randbytes(BIG)


class Upgraded(LoopBase):
    """propose -> coding -> feedback; ``feedback`` changes ``self`` (it runs alone)."""

    def __init__(self, settings: LoopSettings | None = None) -> None:
        super().__init__(settings)
        self.big = big_bytes()
        self.notes: list[str] = []
        self.score = 0

    def propose(self, prev_out: dict[str, Any]) -> dict[str, Any]:
        li = prev_out[self.LOOP_IDX_KEY]
        return {"idea": f"idea-{li}", "n": li}

    def coding(self, prev_out: dict[str, Any]) -> Any:
        li = prev_out[self.LOOP_IDX_KEY]
        assert prev_out["propose"]["n"] == li
        if li % 3 == 1:  # in parallel, the next loop finishes first
            time.sleep(0.2)
        if li == 0:
            return random.Random(li).randbytes(LARGE_OUTPUT)
        return f"code-{li}"

    def feedback(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        self.notes.append(f"feedback-{li}")
        self.score += li + 1
        return f"ok-{li}"


def describe(loop: Any) -> dict[str, Any]:
    """What a loaded loop holds, in plain types (the same with either engine)."""
    return {
        "cls": f"{type(loop).__module__}:{type(loop).__qualname__}",
        "step_idx": {int(k): int(v) for k, v in dict(loop.step_idx).items()},
        "loop_prev_out": {int(k): dict(v) for k, v in dict(loop.loop_prev_out).items()},
        "loop_trace": {
            int(k): [(t.step_idx, t.step_name, t.exception) for t in v]
            for k, v in dict(loop.loop_trace).items()
        },
        "loop_idx": int(loop.loop_idx),
        "big_sha256": hashlib.sha256(loop.big).hexdigest(),
        "big_size": len(loop.big),
        "notes": list(loop.notes),
        "score": int(loop.score),
    }


async def _run(loop: LoopBase, **budgets: Any) -> None:
    async with loop.run(**budgets) as results:
        async for _ in results:
            pass


def make_old_session(trace_path: str, report: str, kind: str = "plain") -> None:
    """Run a session, then write what this engine loads back from it to ``report`` (see
    :func:`report_session`). The signing key, if any, comes from the environment, as in
    ``LoopSettings()``.

    ``plain``: 4 loops, 3 finished and loop 3 with 2 of its 3 steps. ``edited``: the same,
    then the newest step file is dumped again after the application deleted finished loop
    1's outputs and replaced finished loop 0's trace (archived again: a second outputs file
    for loop 0). ``parallel``: 3 loops in flight (steps in threads) for 16 steps, then 5
    more steps in a second run of the loop loaded back: loops finish out of order.
    """
    settings = LoopSettings(trace_path=Path(trace_path), progress=False, durability="flush")
    if kind != "parallel":
        loop = Upgraded(settings)
        anyio.run(lambda: _run(loop, step_n=11))
        if kind == "edited":
            edited = Upgraded.load(trace_path)
            del edited.loop_prev_out[1]
            edited.loop_trace[0] = edited.loop_trace[0][:1]
            edited.dump(Path(trace_path, "__session__", "3", "1_coding"))
    else:
        settings = settings.model_copy(update={"step_semaphore": 3, "step_executor": "thread"})
        loop = Upgraded(settings)
        anyio.run(lambda: _run(loop, step_n=16))
        again = Upgraded.load(trace_path)
        anyio.run(lambda: _run(again, step_n=5))
    report_session(trace_path, report)


def report_session(session: str, report: str) -> None:
    """Write to ``report`` (a pickle of plain types) what this process's engine loads from
    ``session`` (a trace path or a session folder), and from each of its step files."""
    import rdagent_loop

    folder = (
        Path(session, "__session__") if Path(session, "__session__").is_dir() else Path(session)
    )
    steps = sorted(p for p in folder.glob("[0-9]*/[0-9]*_*") if p.is_file())
    data = {
        "engine": rdagent_loop.__file__,
        "loaded": describe(Upgraded.load(session)),
        "steps": {str(p.relative_to(folder)): describe(Upgraded.load(p)) for p in steps},
        "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
    }
    Path(report).write_bytes(pickle.dumps(data))
