"""Helpers shared by the executor tests (importable by worker processes too)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from rdagent_loop import LoopSettings


def settings_for(tmp_path: Path, **kwargs: Any) -> LoopSettings:
    return LoopSettings(trace_path=tmp_path / "trace", progress=False, durability="flush", **kwargs)


def is_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for init counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until every pid is gone; return those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = [pid for pid in pids if not is_gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if not is_gone(pid)]
    return alive


def my_children() -> list[psutil.Process]:
    """Every descendant of the test process, zombies included (an unreaped child is a leak)."""
    return psutil.Process().children(recursive=True)


def _written(path: Path) -> str | None:
    text = path.read_text() if path.exists() else ""
    return text if text.strip() else None


def wait_for_file(path: Path, timeout: float = 15.0) -> str:
    """Block until a step has written ``path`` (outside an event loop only)."""
    deadline = time.monotonic() + timeout
    while (text := _written(path)) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} was not written within {timeout}s")
        time.sleep(0.02)
    return text


async def await_file(path: Path, timeout: float = 15.0) -> str:
    """Wait, without blocking the event loop, until a step has written ``path``."""
    with anyio.fail_after(timeout):
        while (text := _written(path)) is None:
            await anyio.sleep(0.02)
    return text
