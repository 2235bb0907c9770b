"""Executor tests: every test leaves no child process behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from executor_helpers import my_children


@pytest.fixture
def no_child_left() -> Iterator[None]:
    before = {p.pid for p in my_children()}
    yield
    left = [p for p in my_children() if p.pid not in before]
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
