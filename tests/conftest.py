"""Shared fixtures: every async test runs on asyncio and trio through AnyIO's pytest plugin.

Tests of timing logic use ``virtual_clock_params()`` (tests/looplib.py) instead: trio's
``MockClock`` with ``autojump_threshold=0``, or a looptime event loop for asyncio; both jump
to the next deadline as soon as every task is blocked, so the assertions on time are exact
and need no real waiting. asyncio runs in debug mode.

Every async test also runs under blockbuster: a blocking call the engine makes on the event
loop's thread (``time.sleep``, file I/O, a wait on a ``threading`` lock...) fails it with
``BlockingError``. What may block all the same is in ``ALLOWED_TO_BLOCK``, each with why.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blockbuster.blockbuster
import pytest
import trio
from blockbuster import BlockBuster, BlockBusterFunction

import rdagent_loop
from rdagent_loop import LoopSettings

BACKENDS = [
    pytest.param(("asyncio", {"debug": True}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture
def settings(tmp_path: Path) -> LoopSettings:
    """Settings writing the session under the test's own folder, without a progress display."""
    return LoopSettings(trace_path=tmp_path / "trace", progress=False, durability="flush")


# -- blocking calls on the event loop's thread --------------------------------------------
#
# blockbuster wraps the blocking functions of the standard library (time.sleep, file and
# socket I/O, os.stat/listdir/..., threading.Lock.acquire when it would wait...) and raises
# BlockingError when one is called on an event loop's thread. Checked here: calls made by
# the engine, i.e. with one of rdagent_loop's coroutines on the stack (``_engine_blocks``).
# Not checked: a test's own code (its body calling the sync API ``load``/``list_snapshots``,
# or reading its files), and the steps the engine runs inline, which are the application's.
# To tighten: set CHECK_ASYNC_STEPS, or delete entries of ALLOWED_TO_BLOCK.

CHECK_ASYNC_STEPS = False
"""Also check async steps (user code awaited by the engine). Off: the data-science example's
async steps and a step of tests/session/test_session_resume.py read and write files inline."""

_FILE_IO = ("io.BufferedReader.read", "io.TextIOWrapper.read", "os.listdir")
_SPAWN = os.path.join("rdagent_loop", "_executors", "_process.py")

ALLOWED_TO_BLOCK: list[tuple[tuple[str, ...], str, set[str], str]] = [
    # (blocking functions as blockbuster names them, file, functions allowed to call them)
    (
        ("os.read",),
        _SPAWN,
        {"__init__"},  # _Worker.__init__
        "starting a worker: Popen waits for the child's exec, as asyncio's and trio's own "
        "open_process do",
    ),
    (
        _FILE_IO,
        _SPAWN,
        {"_descendants"},
        "killing a worker lists its descendants in /proc: procfs, no disk",
    ),
    (
        ("os.getcwd", "os.path.abspath"),
        _SPAWN,
        {"_preparation_data", "_sys_path"},
        "what a new worker needs to import the application: a few cheap system calls",
    ),
]

_LIBRARY = str(Path(rdagent_loop.__file__).parent)
_INLINE = os.path.join(_LIBRARY, "_executors", "_inline.py")
_LOOP = os.path.join(_LIBRARY, "_loop.py")
_CALLS_USER_CODE = {"_call", "memo_blocking"}  # loop.memo's fn is the application's
_ASYNC = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _engine_blocks() -> bool:
    """Whether the blocking call being checked is the engine's: one of rdagent_loop's
    coroutines (the engine's tasks) is on the stack, and the call is not made by a step that
    ``InlineExecutor.run`` called (a sync step there runs on the event loop by choice; an
    async step is checked with CHECK_ASYNC_STEPS only)."""
    frame = sys._getframe(2)  # the caller of blockbuster's wrapper
    callee = None
    while frame is not None:
        code = frame.f_code
        if code.co_filename == _INLINE and callee is not None:
            return bool(callee.co_flags & _ASYNC) and CHECK_ASYNC_STEPS
        if (
            code.co_filename == _LOOP
            and code.co_name in _CALLS_USER_CODE
            and callee is not None
            and not callee.co_filename.startswith(_LIBRARY)
        ):
            return False
        if code.co_flags & _ASYNC and code.co_filename.startswith(_LIBRARY):
            return True
        callee = code
        frame = frame.f_back
    return False


def _writes_to_devnull(file: object, *args: object, **kwargs: object) -> bool:
    """pytest's log-file handler writes every log record to os.devnull when no log_file is
    set: the engine logging a warning there writes nothing anywhere."""
    return getattr(file, "name", None) == os.devnull


class _EventLoopProbe:
    """Stands in for ``asyncio`` in blockbuster, which asks ``asyncio.get_running_loop()``
    whether it runs on an event loop's thread and so would check nothing under trio."""

    @staticmethod
    def get_running_loop() -> object:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            return trio.lowlevel.current_trio_token()  # RuntimeError outside trio's thread


def _narrow(function: BlockBusterFunction) -> None:
    """Check only the engine's calls (before ``activate``, which reads the predicate)."""
    allowed = function.can_block_predicate
    devnull = function.full_name.endswith(".write")

    def can_block(*args: Any, **kwargs: Any) -> bool:
        if allowed(*args, **kwargs) or (devnull and _writes_to_devnull(*args, **kwargs)):
            return True
        return not _engine_blocks()

    function.can_block_predicate = can_block


@pytest.fixture(autouse=True)
def no_blocking_calls(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Fail an async test when the engine blocks the event loop's thread (see above)."""
    if not inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        yield
        return
    monkeypatch.setattr(blockbuster.blockbuster, "asyncio", _EventLoopProbe)
    detector = BlockBuster()
    for function in detector.functions.values():
        _narrow(function)
    for names, filename, functions, _why in ALLOWED_TO_BLOCK:
        for name in names:
            detector.functions[name].can_block_in(filename, functions)
    detector.activate()
    try:
        yield
    finally:
        detector.deactivate()
