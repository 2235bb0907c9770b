"""Shared fixtures: every async test runs on asyncio and trio through AnyIO's pytest plugin.

Tests of timing logic use ``virtual_clock_backend`` instead: trio's ``MockClock`` with
``autojump_threshold=0``, or a looptime event loop for asyncio; both jump to the next deadline
as soon as every task is blocked, so the assertions on time are exact and need no real waiting.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rdagent_loop import LoopSettings

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture
def settings(tmp_path: Path) -> LoopSettings:
    """Settings writing the session under the test's own folder, without a progress display."""
    return LoopSettings(trace_path=tmp_path / "trace", progress=False, durability="flush")
