"""The step journal across a SIGKILL of the whole run (DESIGN §3.1, §3.2), on asyncio and trio.

A child process (``journal_crash_child.py``) runs one loop of a class of
``journal_crash_loops`` under the backend the test names; its middle step says in a file when
it has reached the point the test wants, then blocks, and the test SIGKILLs the child. The
test then loads the session and resumes it here, in this process, and checks what a re-run
must not pay for twice: memoized calls already made are not made again, an answer already
given is not asked for again, and a question left open is open again under the same id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psutil
import pytest
from journal_crash_loops import CALLS, Asking, Memoizing, MemoizingInWorker

import rdagent_loop
from rdagent_loop import LoopBase, Question, RunSummary, StepResult, pending_questions

HANG = 60.0  # seconds: a bound that only a hang reaches, never a slow machine
CHILD = Path(__file__).with_name("journal_crash_child.py")
BACKENDS = ["asyncio", "trio"]
VERDICT = {"approved": True, "note": "go ahead"}


# -- the child run -------------------------------------------------------------------------


class Child:
    """A run in a child process, started in ``folder``; its stderr goes to ``child.log``."""

    def __init__(
        self, folder: Path, backend: str, cls: type[LoopBase], block_after: int, executor: str
    ) -> None:
        self.folder = folder
        self.trace = folder / "trace"
        self.log = folder / "child.log"
        args = [backend, str(folder), cls.__name__, str(block_after), executor]
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(CHILD), *args], cwd=folder, stderr=err
            )

    def wait_until(self, condition: Callable[[], Any], what: str) -> Any:
        """Poll ``condition`` until it holds (its value), while the child runs."""

        def found() -> Any:
            assert self.proc.poll() is None, f"the child ended before {what}:\n{self.read_log()}"
            return condition()

        return wait_for(found, what, self.read_log)

    def open_questions(self) -> list[Question]:
        """The session's open questions, once the child has created the session."""
        if not (self.trace / "__session__").is_dir():
            return []
        return pending_questions(self.trace)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=HANG) == -signal.SIGKILL, self.read_log()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def read_log(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start a child run (at most one per test); it is killed if the test ends early."""
    children: list[Child] = []

    def start(
        backend: str, cls: type[LoopBase], block_after: int, executor: str = "inline"
    ) -> Child:
        children.append(Child(tmp_path, backend, cls, block_after, executor))
        return children[-1]

    yield start
    for child in children:
        child.stop()


def wait_for(condition: Callable[[], Any], what: str, log: Callable[[], str] = str) -> Any:
    """Poll ``condition`` until it holds, and return its value; fail after ``HANG``."""
    deadline = time.monotonic() + HANG
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} after {HANG}s\n{log()}"
        time.sleep(0.02)
    return found


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- the resumed run -----------------------------------------------------------------------


class Resumed:
    """The session resumed in this process and run to its end: its items and summary."""

    def __init__(
        self,
        cls: type[LoopBase],
        trace: Path,
        backend: str,
        on_question: Callable[[Any, Question], Any] | None = None,
    ) -> None:
        self.loop = cls.load(trace)
        self.items: list[StepResult | Question] = []
        self.summary: RunSummary | None = None
        anyio.run(self._run, on_question, backend=backend)

    async def _run(self, on_question: Callable[[Any, Question], Any] | None) -> None:
        with anyio.fail_after(HANG):
            async with self.loop.run() as results:
                async for item in results:
                    self.items.append(item)
                    if isinstance(item, Question) and on_question is not None:
                        await on_question(results, item)
            self.summary = results.summary

    @property
    def questions(self) -> list[Question]:
        return [item for item in self.items if isinstance(item, Question)]

    def output(self, step_name: str) -> Any:
        (found,) = [
            item.output
            for item in self.items
            if isinstance(item, StepResult) and item.step_name == step_name
        ]
        return found

    def waits(self, step_name: str) -> tuple[Any, ...]:
        """When the resumed step waited for answers (its LoopTrace)."""
        (trace,) = [t for t in self.loop.loop_trace[0] if t.step_name == step_name]
        return trace.waits


# -- 1. memoized calls --------------------------------------------------------------------


def paid_calls(folder: Path) -> list[tuple[str, str]]:
    """The calls made, in order: ``(key, nonce)``."""
    calls = folder / "calls"
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [tuple(line.split()) for line in lines]  # type: ignore[misc]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("cls", "executor"),
    [(Memoizing, "inline"), (MemoizingInWorker, "process")],
    ids=["async-step", "process-step"],
)
def test_memoized_calls_made_before_a_sigkill_are_not_made_again(
    start: Callable[..., Child],
    tmp_path: Path,
    backend: str,
    cls: type[LoopBase],
    executor: str,
) -> None:
    k = 2
    child = start(backend, cls, k, executor)
    ready = tmp_path / "ready"
    child.wait_until(ready.exists, "ready marker")
    blocked_in = int(ready.read_text())  # the pid of the process the step blocks in
    child.kill()
    if executor == "process":
        assert blocked_in != child.proc.pid  # a worker process, which dies with the run
        wait_for(lambda: gone(blocked_in), f"end of worker {blocked_in}")
    before = paid_calls(tmp_path)
    assert [key for key, _ in before] == [f"call{i}" for i in range(k)]

    resumed = Resumed(cls, child.trace, backend)

    calls = paid_calls(tmp_path)
    assert Counter(key for key, _ in calls) == {f"call{i}": 1 for i in range(CALLS)}
    assert calls[:k] == before
    assert resumed.summary is not None
    assert resumed.summary.replayed == k
    assert (resumed.summary.steps, resumed.summary.loops) == (2, 1)
    # the journaled values, not new ones: the nonces of the calls made before the kill
    expected = [f"{key}:{nonce}" for key, nonce in sorted(calls)]
    assert resumed.output("work") == resumed.output("record") == expected


# -- 2. answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_answer_given_just_before_a_sigkill_is_not_asked_for_again(
    start: Callable[..., Child], tmp_path: Path, backend: str
) -> None:
    child = start(backend, Asking, 1)
    (question,) = child.wait_until(child.open_questions, "open question")
    rdagent_loop.answer(child.trace, question.id, VERDICT)
    # the step got the answer (so the engine journaled it), and the engine took the file
    child.wait_until((tmp_path / "ready").exists, "ready marker")
    left = child.trace / "__session__" / ".answers" / question.id
    child.wait_until(lambda: not left.exists(), f"{left} taken")
    child.kill()
    assert pending_questions(child.trace) == []

    resumed = Resumed(Asking, child.trace, backend)

    assert resumed.questions == []
    assert resumed.output("decide") == resumed.output("record") == VERDICT
    assert resumed.waits("decide") == ()  # it got the answer at once
    assert resumed.summary is not None and resumed.summary.loops == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_answer_left_while_no_run_runs_is_taken_by_the_resumed_run(
    start: Callable[..., Child], tmp_path: Path, backend: str
) -> None:
    child = start(backend, Asking, 0)
    (question,) = child.wait_until(child.open_questions, "open question")
    child.kill()
    rdagent_loop.answer(child.trace, question.id, VERDICT)
    assert pending_questions(child.trace) == []

    async def nobody_answers(results: Any, item: Question) -> None:
        pass

    resumed = Resumed(Asking, child.trace, backend, nobody_answers)

    # nobody had to answer: the run journaled the answer left in the session before any
    # step could ask, so the question is not asked again
    assert resumed.questions == []
    assert resumed.output("decide") == resumed.output("record") == VERDICT
    assert list((child.trace / "__session__" / ".answers").iterdir()) == []
    with pytest.raises(KeyError, match=question.id):
        rdagent_loop.answer(child.trace, question.id, "again")


# -- 3. open questions ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("answered_by", ["stream", "session"])
def test_a_question_open_at_a_sigkill_is_open_again_with_the_same_id(
    start: Callable[..., Child], tmp_path: Path, backend: str, answered_by: str
) -> None:
    child = start(backend, Asking, 0)
    (question,) = child.wait_until(child.open_questions, "open question")
    child.kill()
    assert pending_questions(child.trace) == [question]

    open_while_resumed: list[list[str]] = []

    async def answer(results: Any, item: Question) -> None:
        found = await anyio.to_thread.run_sync(pending_questions, child.trace)
        open_while_resumed.append([q.id for q in found])
        if answered_by == "stream":
            results.answer(item.id, VERDICT)
        else:
            await anyio.to_thread.run_sync(rdagent_loop.answer, child.trace, item.id, VERDICT)

    resumed = Resumed(Asking, child.trace, backend, answer)

    assert resumed.questions == [question]  # the same question: id, text, payload, time
    assert open_while_resumed == [[question.id]]
    assert resumed.output("decide") == resumed.output("record") == VERDICT
    assert len(resumed.waits("decide")) == 1
    assert pending_questions(child.trace) == []
