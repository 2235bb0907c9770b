"""Helpers shared by the executor tests (importable by worker processes too).

Real processes run in these tests, so nothing here measures how fast they are: tests wait for
files the steps write ("I have started") and for processes to be gone, each with a generous
bound that only guards against a hang. The async helpers do their file and ``/proc`` reads
in a thread, so the event loop never blocks on them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psutil

from rdagent_loop import LoopBase, LoopSettings, RunSummary

HANG = 60.0  # seconds: a bound that only a hang reaches, never a slow machine
LONG = 600  # seconds a step or its job would run if nothing killed it (far beyond HANG)


def settings_for(tmp_path: Path, **kwargs: Any) -> LoopSettings:
    return LoopSettings(trace_path=tmp_path / "trace", progress=False, durability="flush", **kwargs)


def is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: Iterable[int], timeout: float = HANG) -> list[int]:
    """Wait until every pid is gone; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if not is_gone(pid)]
    return alive


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if not is_gone(pid)]


async def await_gone(pids: Iterable[int], timeout: float = HANG) -> list[int]:
    """``wait_gone`` for async tests: each look at ``/proc`` runs in a thread."""
    alive = await anyio.to_thread.run_sync(_alive, list(pids))
    with anyio.move_on_after(timeout):
        while alive:
            await anyio.sleep(0.02)
            alive = await anyio.to_thread.run_sync(_alive, alive)
    return alive


def my_children() -> list[psutil.Process]:
    """Every descendant of the test process, zombies included (an unreaped child is a leak)."""
    return psutil.Process().children(recursive=True)


def _written(path: Path) -> str | None:
    text = path.read_text() if path.exists() else ""
    return text if text.strip() else None


def wait_for_file(path: Path, timeout: float = HANG) -> str:
    """Block until a step has written ``path`` (outside an event loop only)."""
    deadline = time.monotonic() + timeout
    while (text := _written(path)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not written within {timeout}s")
        time.sleep(0.02)
    return text


async def await_file(path: Path, timeout: float = HANG) -> str:
    """Wait, without blocking the event loop, until a step has written ``path``."""
    with anyio.fail_after(timeout):
        while (text := await anyio.to_thread.run_sync(_written, path)) is None:
            await anyio.sleep(0.02)
    return text


def end_budget(loop: LoopBase) -> None:
    """Spend what is left of the running ``all_duration`` budget: its deadline is now."""
    remaining = loop.timer.remain_time()
    assert remaining is not None, "the run has no all_duration budget"
    loop.timer.add_duration(-remaining)


async def run_until_written(loop: LoopBase, files: list[Path], **budgets: Any) -> RunSummary:
    """Run ``loop`` with an ``all_duration`` budget that runs out once every file in ``files``
    exists: the steps that write them have started, however long their workers took to
    start. The budget set at first (an hour) is never what ends the run."""

    async def end_when_written() -> None:
        for file in files:
            await await_file(file)
        end_budget(loop)

    async with anyio.create_task_group() as tg:
        tg.start_soon(end_when_written)
        summary = await loop.run(all_duration="1h", **budgets)
        tg.cancel_scope.cancel()
    return summary
