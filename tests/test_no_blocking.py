"""The blocking-call detector of tests/conftest.py is on, on asyncio and trio, and checks
the engine only: not a step run inline by choice, not a test's own body. asyncio runs in
debug mode."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from blockbuster import BlockingError
from looplib import Chain

from rdagent_loop import LoopBase, LoopSettings

pytestmark = pytest.mark.anyio


class SleepsWhileSaving(Chain):
    """The engine calls ``dump`` from its own task: a sleep there blocks the event loop."""

    def dump(self, path: str | Path) -> None:
        time.sleep(0)
        super().dump(path)


class SleepsInline(LoopBase):
    def s0(self, prev_out: dict[str, Any]) -> int:
        time.sleep(0)  # a sync step run inline blocks by choice
        return 0


async def test_the_engine_blocking_the_event_loop_fails_the_test(settings: LoopSettings) -> None:
    with pytest.raises(BlockingError, match=r"time\.sleep"):
        await SleepsWhileSaving(settings).run(loop_n=1)


async def test_inline_steps_and_the_tests_own_code_may_block(settings: LoopSettings) -> None:
    summary = await SleepsInline(settings).run(loop_n=1)
    assert summary.loops == 1
    assert (settings.trace_path / "__session__").is_dir()  # a test's own file access
    assert SleepsInline.load(settings.trace_path).step_idx[0] == 1  # sync API, from the test


async def test_asyncio_runs_in_debug_mode(anyio_backend_name: str) -> None:
    if anyio_backend_name == "asyncio":
        assert asyncio.get_running_loop().get_debug()
