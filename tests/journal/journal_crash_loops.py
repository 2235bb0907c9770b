"""Loop classes of test_journal_crash.py (a module of their own, so that snapshots unpickle
in the test, in its child processes and in their process workers).

Every class runs ``propose`` -> a middle step -> ``record``: ``propose`` completing writes a
snapshot, so a run killed in the middle step can be resumed with ``Cls.load``. The middle
step blocks, the first time only, at a point the test chose, after saying so in a file of
``folder`` (the ``ready`` marker); the test then kills the run.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from rdagent_loop import LoopBase, LoopSettings

CALLS = 4
"""Memoized calls the middle step of the memo loops makes."""


def write_marker(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: the test reads it as soon as it exists."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def paid_call(calls: Path, key: str) -> str:
    """A call a re-run must not pay for twice: it notes ``key`` and a fresh nonce in
    ``calls`` and returns them, so a value made again differs from the journaled one."""
    nonce = uuid.uuid4().hex
    with calls.open("a") as f:
        f.write(f"{key} {nonce}\n")
    return f"{key}:{nonce}"


async def paid_call_async(calls: Path, key: str) -> str:
    await anyio.lowlevel.checkpoint()
    return paid_call(calls, key)


class _Blocks(LoopBase):
    """What the loops share: the folder of the test's files, and where to block."""

    def __init__(self, settings: LoopSettings, folder: Path, block_after: int = 0) -> None:
        super().__init__(settings)
        self.folder = folder
        self.block_after = block_after

    @property
    def ready(self) -> Path:
        return self.folder / "ready"

    @property
    def calls(self) -> Path:
        return self.folder / "calls"

    def _first_time(self) -> bool:
        """Whether the step should block: only in the run the test kills."""
        return not self.ready.exists()


class Memoizing(_Blocks):
    """An async step makes ``CALLS`` memoized calls; the first run blocks after
    ``block_after`` of them."""

    async def propose(self, prev_out: dict[str, Any]) -> str:
        return "proposed"

    async def work(self, prev_out: dict[str, Any]) -> list[str]:
        values = []
        for i in range(CALLS):
            values.append(await self.memo(f"call{i}", paid_call_async, self.calls, f"call{i}"))
            if i + 1 == self.block_after and self._first_time():
                write_marker(self.ready, str(os.getpid()))
                await anyio.sleep_forever()
        return values

    async def record(self, prev_out: dict[str, Any]) -> list[str]:
        return list(prev_out["work"])


class MemoizingInWorker(_Blocks):
    """``Memoizing`` with a sync middle step, for the ``process`` executor: it blocks in the
    worker process, whose pid the ``ready`` marker holds."""

    def propose(self, prev_out: dict[str, Any]) -> str:
        return "proposed"

    def work(self, prev_out: dict[str, Any]) -> list[str]:
        values = []
        for i in range(CALLS):
            values.append(self.memo_blocking(f"call{i}", paid_call, self.calls, f"call{i}"))
            if i + 1 == self.block_after and self._first_time():
                write_marker(self.ready, str(os.getpid()))
                threading.Event().wait()
        return values

    def record(self, prev_out: dict[str, Any]) -> list[str]:
        return list(prev_out["work"])


class Asking(_Blocks):
    """An async step asks one question; with ``block_after=1`` the first run blocks once
    ``ask`` has returned (the ``ready`` marker holds the answer), else it returns it."""

    async def propose(self, prev_out: dict[str, Any]) -> str:
        return "proposed"

    async def decide(self, prev_out: dict[str, Any]) -> Any:
        answer = await self.ask("approve the proposal?", payload=prev_out["propose"])
        if self.block_after and self._first_time():
            write_marker(self.ready, repr(answer))
            await anyio.sleep_forever()
        return answer

    async def record(self, prev_out: dict[str, Any]) -> Any:
        return prev_out["decide"]


LOOPS = {cls.__name__: cls for cls in (Memoizing, MemoizingInWorker, Asking)}
