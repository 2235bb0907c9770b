"""Executor tests: every test leaves no child process behind.

Without Ray installed, test_ray.py is not collected at all (rather than reported skipped in
every session): the ``ray`` nox session installs Ray and runs it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from executor_helpers import my_children

collect_ignore = [] if importlib.util.find_spec("ray") is not None else ["test_ray.py"]


@pytest.fixture
def no_child_left() -> Iterator[None]:
    before = {p.pid for p in my_children()}
    yield
    left = [p for p in my_children() if p.pid not in before]
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
