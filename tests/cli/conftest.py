from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run_cli


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Any]:
    """``cli("run", ...)``: the command, run in ``tmp_path``; returns the finished process."""

    def run(*args: str, timeout: float = 90) -> Any:
        return run_cli(*args, cwd=tmp_path, timeout=timeout)

    return run
